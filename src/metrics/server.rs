//! The metrics endpoint: a unix socket or a loopback TCP port, served by a
//! tiny HTTP/1.1 responder on threads of its own.
//!
//! Bounded in every way a client controls:
//! - at most [`SERVER_THREADS`] connections are served at once; more wait
//!   in the listen backlog (the kernel's, bounded);
//! - a request is read into a fixed [`MAX_REQUEST`]-byte buffer, never
//!   more; larger headers get `431` and the connection is closed;
//! - a client that sends nothing for [`FIRST_BYTE_WAIT`] gets the bare
//!   exposition (no HTTP headers), so `socat - UNIX-CONNECT:PATH` or
//!   `nc -U PATH` show the metrics; a started request must be complete
//!   within [`REQUEST_DEADLINE`] (else `408`); writes time out after
//!   [`WRITE_TIMEOUT`];
//! - what is written is the exposition, whose size depends on the number
//!   of series (bounded by `--max-contexts`), never on the request.
//!
//! The listening socket is made at start-up, before the sandbox; serving
//! needs `accept4`, `read`/`recvfrom`, `write`/`sendto`, `setsockopt`
//! (`SO_RCVTIMEO`/`SO_SNDTIMEO` only), `shutdown` and `close`, all on the
//! allowlist of `crate::sandbox`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Metrics, RequestResult};

/// Connections served at once.
pub const SERVER_THREADS: usize = 4;
/// The request buffer: request line and headers must fit.
pub const MAX_REQUEST: usize = 8192;
/// How long a connection may stay silent before it gets the bare
/// exposition.
pub const FIRST_BYTE_WAIT: Duration = Duration::from_millis(250);
/// How long a started request may take to arrive.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// How long one write may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the metrics are served (`--metrics`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    /// `unix:PATH`: a unix stream socket, mode 0600.
    Unix(PathBuf),
    /// `tcp:ADDR:PORT` with a loopback address.
    Tcp(SocketAddr),
}

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<MetricsAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path (unix:/run/vhost-gpu-nc/metrics.sock)".into());
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            let addr: SocketAddr = addr.parse().map_err(|e| {
                format!("tcp:{addr}: not an IP address and port ({e}); e.g. tcp:127.0.0.1:9464")
            })?;
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "tcp:{addr}: not a loopback address; the metrics show per-guest data to \
                     whoever can connect, so only 127.0.0.0/8 and [::1] are served (put a \
                     proxy in front to expose them further)"
                ));
            }
            return Ok(MetricsAddr::Tcp(addr));
        }
        Err(format!(
            "{s}: expected unix:PATH or tcp:127.0.0.1:PORT (or tcp:[::1]:PORT)"
        ))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            MetricsAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// The listening socket of the endpoint.
#[derive(Debug)]
pub enum MetricsListener {
    /// A unix socket (its path, removed on exit).
    Unix(UnixListener, PathBuf),
    /// A TCP socket on loopback.
    Tcp(TcpListener),
}

impl MetricsListener {
    /// Binds and listens on `addr`: a stale socket file at a unix path is
    /// replaced (any other file is an error), and the socket gets mode
    /// 0600 (only the daemon's user may read the metrics).
    pub fn bind(addr: &MetricsAddr) -> io::Result<MetricsListener> {
        match addr {
            MetricsAddr::Unix(path) => {
                match std::fs::symlink_metadata(path) {
                    Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
                    Ok(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                let l = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(MetricsListener::Unix(l, path.clone()))
            }
            MetricsAddr::Tcp(a) => Ok(MetricsListener::Tcp(TcpListener::bind(a)?)),
        }
    }

    /// Where it listens (the real port of `tcp:...:0`).
    pub fn describe(&self) -> String {
        match self {
            MetricsListener::Unix(_, p) => format!("unix:{}", p.display()),
            MetricsListener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
        }
    }

    /// The socket file, if it is a unix socket.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            MetricsListener::Unix(_, p) => Some(p.clone()),
            MetricsListener::Tcp(_) => None,
        }
    }

    fn try_clone(&self) -> io::Result<MetricsListener> {
        Ok(match self {
            MetricsListener::Unix(l, p) => MetricsListener::Unix(l.try_clone()?, p.clone()),
            MetricsListener::Tcp(l) => MetricsListener::Tcp(l.try_clone()?),
        })
    }

    fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            MetricsListener::Unix(l, _) => Conn::Unix(l.accept()?.0),
            MetricsListener::Tcp(l) => Conn::Tcp(l.accept()?.0),
        })
    }
}

/// One client connection.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_timeouts(&self, read: Duration) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Starts [`SERVER_THREADS`] threads serving `listener` for the life of
/// the process (before the sandbox: thread creation is allowed later too,
/// but nothing need be).
pub fn start(listener: MetricsListener, metrics: Arc<Metrics>) -> io::Result<()> {
    for i in 0..SERVER_THREADS {
        let l = listener.try_clone()?;
        let m = metrics.clone();
        std::thread::Builder::new()
            .name(format!("metrics{i}"))
            .spawn(move || serve(&l, &m))?;
    }
    Ok(())
}

fn serve(listener: &MetricsListener, metrics: &Metrics) {
    let mut failures = 0u32;
    loop {
        match listener.accept() {
            Ok(conn) => {
                failures = 0;
                handle(conn, metrics);
            }
            Err(e) => {
                // Out of fds, say: log the first of a run, do not spin.
                if failures == 0 {
                    log::warn!("metrics: accept: {e}");
                }
                failures = failures.saturating_add(1);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// `GET` (body) or `HEAD` (headers only) of the metrics.
    Metrics {
        /// Whether the body is sent.
        body: bool,
    },
    /// An error response.
    Error(RequestResult),
}

/// Parses a complete request head (request line and headers, ending with
/// an empty line).
pub fn parse(head: &[u8]) -> Parsed {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .or_else(|| head.iter().position(|&b| b == b'\n'))
        .unwrap_or(head.len());
    let Some(line) = head.get(..line_end) else {
        return Parsed::Error(RequestResult::BadRequest);
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Parsed::Error(RequestResult::BadRequest);
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Error(RequestResult::BadRequest);
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Parsed::Error(RequestResult::BadRequest);
    }
    let body = match method {
        "GET" => true,
        "HEAD" => false,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
            return Parsed::Error(RequestResult::MethodNotAllowed);
        }
        _ => return Parsed::Error(RequestResult::BadRequest),
    };
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" && path != "/" {
        return Parsed::Error(RequestResult::NotFound);
    }
    Parsed::Metrics { body }
}

/// Where the head of a request ends (after its empty line), if it does.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))
}

/// How reading a request ended.
#[derive(Debug, PartialEq, Eq)]
enum Received {
    /// A complete head of this many bytes.
    Head(usize),
    /// Nothing at all: the client only reads.
    Nothing,
    /// An error to answer.
    Error(RequestResult),
    /// The connection failed; nothing can be answered.
    Broken,
}

fn receive(conn: &mut Conn, buf: &mut [u8; MAX_REQUEST]) -> Received {
    let started = Instant::now();
    let mut len = 0usize;
    loop {
        if let Some(end) = buf.get(..len).and_then(head_end) {
            return Received::Head(end);
        }
        let Some(free) = buf.get_mut(len..).filter(|f| !f.is_empty()) else {
            return Received::Error(RequestResult::TooLarge);
        };
        match conn.read(free) {
            Ok(0) if len == 0 => return Received::Nothing,
            Ok(0) => return Received::Error(RequestResult::BadRequest),
            Ok(n) => len += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if len == 0 {
                    return Received::Nothing;
                }
                if started.elapsed() >= REQUEST_DEADLINE {
                    return Received::Error(RequestResult::Timeout);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Received::Broken,
        }
    }
}

fn status_line(result: RequestResult) -> &'static str {
    match result {
        RequestResult::Ok | RequestResult::Bare => "200 OK",
        RequestResult::BadRequest => "400 Bad Request",
        RequestResult::NotFound => "404 Not Found",
        RequestResult::MethodNotAllowed => "405 Method Not Allowed",
        RequestResult::Timeout => "408 Request Timeout",
        RequestResult::TooLarge => "431 Request Header Fields Too Large",
    }
}

fn handle(mut conn: Conn, metrics: &Metrics) {
    if let Err(e) = conn.set_timeouts(FIRST_BYTE_WAIT) {
        log::debug!("metrics: socket timeouts: {e}");
        return;
    }
    let mut buf = [0u8; MAX_REQUEST];
    let received = receive(&mut conn, &mut buf);
    let written = match received {
        Received::Broken => return,
        Received::Nothing => {
            metrics.count_request(RequestResult::Bare);
            conn.write_all(metrics.render().as_bytes())
        }
        Received::Head(end) => match parse(buf.get(..end).unwrap_or_default()) {
            Parsed::Metrics { body } => {
                metrics.count_request(RequestResult::Ok);
                let text = metrics.render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {}; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    prometheus::TEXT_FORMAT,
                    text.len()
                );
                conn.write_all(head.as_bytes()).and_then(|()| {
                    if body {
                        conn.write_all(text.as_bytes())
                    } else {
                        Ok(())
                    }
                })
            }
            Parsed::Error(r) => error_response(&mut conn, metrics, r),
        },
        Received::Error(r) => error_response(&mut conn, metrics, r),
    };
    if let Err(e) = written {
        log::debug!("metrics: writing the response: {e}");
        return;
    }
    conn.shutdown_write();
    // Drain what the client still sends, so that closing with unread data
    // does not reset the connection before the client read the answer;
    // bounded in bytes and time, into the same buffer.
    let _ = conn.set_timeouts(Duration::from_millis(100));
    let until = Instant::now() + DRAIN_TIME;
    let mut drained = 0usize;
    while drained < DRAIN_BYTES && Instant::now() < until {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Most bytes read and dropped after the answer.
const DRAIN_BYTES: usize = 1 << 20;
/// Longest time spent on that.
const DRAIN_TIME: Duration = Duration::from_millis(500);

fn error_response(conn: &mut Conn, metrics: &Metrics, r: RequestResult) -> io::Result<()> {
    metrics.count_request(r);
    let reason = status_line(r);
    let body = format!("{reason}: the endpoint serves GET /metrics\n");
    let response = format!(
        "HTTP/1.1 {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_non_loopback_is_refused() {
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:9464".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        assert!("tcp:[::1]:9464".parse::<MetricsAddr>().is_ok());
        assert!("tcp:127.3.4.5:1".parse::<MetricsAddr>().is_ok());
        for bad in ["tcp:0.0.0.0:9464", "tcp:192.168.1.2:9464", "tcp:[::]:9464"] {
            let e = bad.parse::<MetricsAddr>().unwrap_err();
            assert!(e.contains("not a loopback address"), "{bad}: {e}");
        }
        assert!("tcp:localhost:9464".parse::<MetricsAddr>().is_err());
        assert!("unix:".parse::<MetricsAddr>().is_err());
        assert!("/run/m.sock".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Parsed::Metrics { body: true }
        );
        assert_eq!(
            parse(b"GET / HTTP/1.0\r\n\r\n"),
            Parsed::Metrics { body: true }
        );
        assert_eq!(
            parse(b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n"),
            Parsed::Metrics { body: false }
        );
        assert_eq!(
            parse(b"GET /other HTTP/1.1\r\n\r\n"),
            Parsed::Error(RequestResult::NotFound)
        );
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Parsed::Error(RequestResult::MethodNotAllowed)
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Parsed::Error(RequestResult::BadRequest),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_head_ends_at_the_empty_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
