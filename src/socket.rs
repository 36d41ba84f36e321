//! Where the frontend connection comes from: a socket path the daemon
//! binds, or a socket the management layer passes in.
//!
//! QEMU's vhost-user spec ("Backend program conventions") asks a backend to
//! accept `--socket-path=PATH` and `--fd=FDNUM`. Two kinds of inherited
//! socket exist in practice, and both are accepted:
//!
//! - a **listening** socket: systemd socket activation (`LISTEN_FDS`, fd 3)
//!   or a supervisor that bound the path itself. The daemon accepts one
//!   frontend after the other on it, as it does on its own socket.
//! - a **connected** socket: libvirt starts a vhost-user GPU backend with
//!   `--fd=N`, one end of a `socketpair()`, and hands QEMU the other end
//!   (`-chardev socket,fd=M`). There is exactly one frontend; when it goes
//!   away the daemon exits, as QEMU's own `vhost-user-gpu` does.
//!
//! vhost-user-backend 0.24 serves only connections it accepts from a
//! [`Listener`] itself, so a connected socket is bridged: the daemon
//! accepts on a private listening socket (in a fresh mode-0700 directory,
//! unlinked before any frontend byte is read) and a relay moves each
//! vhost-user message, with the file descriptors attached to it, between
//! that connection and the inherited socket. Only control messages cross
//! it; the virtqueues and their eventfds never do.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Where the frontend connection comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// Bind and listen on this path (an existing socket file is replaced;
    /// the file is removed on SIGINT/SIGTERM).
    Path(PathBuf),
    /// An inherited unix stream socket, listening or connected (`--fd`,
    /// systemd socket activation). Checked, then owned by the daemon.
    Fd(RawFd),
}

impl SocketSource {
    /// The socket file the daemon must remove when it exits, if it made one.
    pub fn owned_path(&self) -> Option<&Path> {
        match self {
            SocketSource::Path(p) => Some(p),
            SocketSource::Fd(_) => None,
        }
    }
}

/// Why an inherited socket or the socket path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// `--fd` names a number that is not an open file descriptor.
    #[error("--fd={fd}: not an open file descriptor: {source}")]
    NotOpen {
        /// The fd.
        fd: RawFd,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `--fd` names something that is not a unix stream socket.
    #[error("--fd={fd}: {what}; a unix domain stream socket (listening or connected) is needed")]
    WrongKind {
        /// The fd.
        fd: RawFd,
        /// What it is instead.
        what: String,
    },
    /// A socket option could not be read.
    #[error("--fd={fd}: getsockopt: {source}")]
    SockOpt {
        /// The fd.
        fd: RawFd,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket path cannot be bound.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// The private socket bridging a connected fd could not be set up.
    #[error("cannot set up the bridge for the connected --fd: {0}")]
    Bridge(#[source] io::Error),
    /// `LISTEN_FDS` is set for this process but unusable.
    #[error("systemd socket activation: {0}")]
    Activation(String),
}

/// An open, checked frontend endpoint.
pub enum Endpoint {
    /// Accept one frontend after the other.
    Listening(Listener),
    /// Serve the one frontend on this connected socket, then exit.
    Connected(UnixStream),
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Listening(l) => write!(f, "Listening(fd {})", l.as_raw_fd()),
            Endpoint::Connected(s) => write!(f, "Connected({s:?})"),
        }
    }
}

/// Opens `source`: binds the path, or checks and takes the inherited fd.
pub fn open(source: &SocketSource) -> Result<Endpoint, SocketError> {
    match source {
        SocketSource::Path(path) => {
            Listener::new(path, true)
                .map(Endpoint::Listening)
                .map_err(|source| SocketError::Listen {
                    path: path.clone(),
                    source,
                })
        }
        SocketSource::Fd(fd) => take_fd(*fd),
    }
}

/// Checks that `fd` is a unix stream socket and takes ownership of it.
/// Nothing is closed or owned unless every check passes.
pub fn take_fd(fd: RawFd) -> Result<Endpoint, SocketError> {
    // SAFETY: fstat only writes into `st`, a plain value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer; a bad fd only yields EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(SocketError::NotOpen {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(SocketError::WrongKind {
            fd,
            what: format!("not a socket ({})", file_kind(st.st_mode)),
        });
    }
    let domain = sockopt(fd, libc::SO_DOMAIN)?;
    if domain != libc::AF_UNIX {
        return Err(SocketError::WrongKind {
            fd,
            what: format!("a socket of address family {domain}, not AF_UNIX"),
        });
    }
    let kind = sockopt(fd, libc::SO_TYPE)?;
    if kind != libc::SOCK_STREAM {
        return Err(SocketError::WrongKind {
            fd,
            what: format!("a unix socket of type {kind}, not SOCK_STREAM"),
        });
    }
    let listening = sockopt(fd, libc::SO_ACCEPTCONN)? != 0;
    // SAFETY: `fd` is an open unix stream socket (checked above) that the
    // process inherited for the daemon: nothing else in it owns the fd.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned);
    if listening {
        return Ok(Endpoint::Listening(Listener::from(UnixListener::from(
            owned,
        ))));
    }
    let stream = UnixStream::from(owned);
    // A connected socket that was never connected (socket() alone) or whose
    // peer is gone is refused now rather than at the first read.
    if let Err(e) = stream.peer_addr() {
        return Err(SocketError::WrongKind {
            fd,
            what: format!("an unconnected, non-listening socket ({e})"),
        });
    }
    Ok(Endpoint::Connected(stream))
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Result<libc::c_int, SocketError> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid out-pointers of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(SocketError::SockOpt {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    Ok(v)
}

fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: F_SETFD on an fd we own; failure leaves it inheritable only.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}

fn file_kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFIFO => "a pipe",
        libc::S_IFLNK => "a symlink",
        _ => "unknown",
    }
}

/// Systemd socket activation (sd_listen_fds(3)): when `LISTEN_PID` is this
/// process and `LISTEN_FDS` is 1, the listening socket is fd 3. The
/// variables are removed so that nothing started later inherits them.
///
/// Returns `Ok(None)` when the process was not socket-activated.
///
/// # Safety
///
/// Changes the environment: call it before the process starts threads.
pub unsafe fn from_systemd_env() -> Result<Option<RawFd>, SocketError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let Some(fds) = fds else { return Ok(None) };
    // SAFETY: the caller guarantees no other thread reads the environment.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let for_us = pid
        .as_deref()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !for_us {
        return Ok(None);
    }
    match fds.parse::<u32>() {
        Ok(1) => Ok(Some(SD_LISTEN_FDS_START)),
        Ok(n) => Err(SocketError::Activation(format!(
            "LISTEN_FDS={n}: exactly one socket is served (ListenStream= once in the .socket unit)"
        ))),
        Err(_) => Err(SocketError::Activation(format!(
            "LISTEN_FDS={fds:?} is not a number"
        ))),
    }
}

/// The first fd systemd passes.
pub const SD_LISTEN_FDS_START: RawFd = 3;

/// vhost-user message header: request, flags, payload size (all u32).
const HEADER_LEN: usize = 12;
/// Largest payload relayed. vhost-user messages are small (the largest, a
/// memory table of 8 regions or a device config space, is a few hundred
/// bytes; the vhost crate itself refuses more than 4 KiB).
const MAX_PAYLOAD: usize = 64 << 10;
/// File descriptors one vhost-user message carries at most.
const MAX_FDS: usize = 32;

/// The daemon's side of a connected `--fd`: a private listener with one
/// pending connection, whose other end the relay joins to the frontend.
pub struct Bridge {
    /// Accept the one connection from this.
    pub listener: Listener,
    /// The two ends the relay joins, until [`Bridge::start`].
    ends: Option<(UnixStream, UnixStream)>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("listener", &self.listener.as_raw_fd())
            .field("started", &self.ends.is_none())
            .finish()
    }
}

impl Bridge {
    /// Sets up the private listener and connects to it. The socket file and
    /// its directory are gone when this returns; nothing has been read from
    /// `frontend` yet.
    pub fn new(frontend: UnixStream) -> Result<Bridge, SocketError> {
        let dir = private_dir().map_err(SocketError::Bridge)?;
        let path = dir.join("bridge.sock");
        let result = (|| {
            let listener = UnixListener::bind(&path)?;
            let inner = UnixStream::connect(&path)?;
            Ok::<_, io::Error>((listener, inner))
        })();
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
        let (listener, inner) = result.map_err(SocketError::Bridge)?;
        Ok(Bridge {
            listener: Listener::from(listener),
            ends: Some((frontend, inner)),
        })
    }

    /// Starts the relay threads: from here on frontend bytes are read.
    pub fn start(&mut self) -> Result<(), SocketError> {
        match self.ends.take() {
            Some((frontend, inner)) => spawn_relay(frontend, inner).map_err(SocketError::Bridge),
            None => Ok(()),
        }
    }
}

fn private_dir() -> io::Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let template = base.join("vhost-gpu-nc.XXXXXX");
    let mut bytes = std::os::unix::ffi::OsStrExt::as_bytes(template.as_os_str()).to_vec();
    bytes.push(0);
    // SAFETY: `bytes` is a NUL-terminated, writable template ending in
    // XXXXXX, as mkdtemp requires; it creates the directory with mode 0700.
    let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    bytes.pop();
    Ok(PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&bytes),
    )))
}

fn spawn_relay(frontend: UnixStream, inner: UnixStream) -> io::Result<()> {
    let (f2, i2) = (frontend.try_clone()?, inner.try_clone()?);
    std::thread::Builder::new()
        .name("relay-in".into())
        .spawn(move || relay(&frontend, &inner, "frontend"))?;
    std::thread::Builder::new()
        .name("relay-out".into())
        .spawn(move || relay(&i2, &f2, "backend"))?;
    Ok(())
}

/// Moves whole vhost-user messages from `from` to `to`, each with the file
/// descriptors that came with it, until either side ends; then shuts both
/// down so the other direction and the vhost-user handler see the end.
fn relay(from: &UnixStream, to: &UnixStream, who: &str) {
    match relay_messages(from, to) {
        Ok(()) => log::debug!("{who} closed the connection"),
        Err(e) => log::warn!("relaying from the {who}: {e}"),
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

fn relay_messages(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
    let mut msg = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
    loop {
        let mut fds: Vec<OwnedFd> = Vec::new();
        if !recv_exact(from, &mut msg[..HEADER_LEN], &mut fds)? {
            return Ok(());
        }
        let size = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message of {size} bytes (at most {MAX_PAYLOAD})"),
            ));
        }
        let total = HEADER_LEN + size;
        if size > 0 && !recv_exact(from, &mut msg[HEADER_LEN..total], &mut fds)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = to
            .send_with_fds(&[&msg[..total]], &raw)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // A short send carried the fds; the rest goes without them.
        while sent < total {
            let n = to
                .send_with_fds(&[&msg[sent..total]], &[])
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += n;
        }
        // `fds` drops here: the receiver has its own copies.
    }
}

/// Fills `buf` completely, collecting the fds that arrive on the way.
/// Returns false on a clean end of stream before the first byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        }];
        // SAFETY: the iovec points into `buf`, writable for its length.
        let (n, nfds) = match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        };
        for &fd in raw.iter().take(nfds) {
            // SAFETY: recvmsg installed these fds in this process for us.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more than 32 file descriptors with one message",
            ));
        }
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn a_file_is_refused_and_stays_open() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let err = take_fd(fd).unwrap_err();
        assert!(matches!(err, SocketError::WrongKind { .. }), "{err}");
        assert!(err.to_string().contains("regular file"), "{err}");
        // Not taken: still open.
        // SAFETY: fcntl F_GETFD only queries the fd.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    }

    #[test]
    fn a_closed_fd_is_refused() {
        let err = take_fd(987_654).unwrap_err();
        assert!(matches!(err, SocketError::NotOpen { .. }), "{err}");
    }

    #[test]
    fn a_datagram_socket_is_refused() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let fd = a.as_raw_fd();
        let err = take_fd(fd).unwrap_err();
        assert!(err.to_string().contains("not SOCK_STREAM"), "{err}");
    }

    #[test]
    fn listening_and_connected_sockets_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        match take_fd(l.into_raw_fd()).unwrap() {
            Endpoint::Listening(_) => {}
            e => panic!("{e:?}"),
        }
        let (a, _b) = UnixStream::pair().unwrap();
        match take_fd(a.into_raw_fd()).unwrap() {
            Endpoint::Connected(_) => {}
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn the_relay_keeps_messages_and_their_fds_together() {
        let (frontend, daemon_end) = UnixStream::pair().unwrap();
        let mut bridge = Bridge::new(daemon_end).unwrap();
        bridge.start().unwrap();
        let inner = bridge.listener.accept().unwrap().unwrap();
        // Two messages back to back, the second with an fd.
        let m1 = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        let mut m2 = vec![5u8, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0];
        m2.extend_from_slice(&[9u8; 8]);
        let file = tempfile::tempfile().unwrap();
        frontend.send_with_fds(&[&m1[..]], &[]).unwrap();
        frontend
            .send_with_fds(&[&m2[..]], &[file.as_raw_fd()])
            .unwrap();
        let mut buf = [0u8; 12];
        let mut fds = Vec::new();
        assert!(recv_exact(&inner, &mut buf, &mut fds).unwrap());
        assert_eq!(buf, m1);
        assert!(fds.is_empty(), "the fd must not ride on the first message");
        let mut buf2 = [0u8; 20];
        assert!(recv_exact(&inner, &mut buf2, &mut fds).unwrap());
        assert_eq!(&buf2[..], &m2[..]);
        assert_eq!(fds.len(), 1);
        // Replies flow back; the frontend closing ends the inner side.
        inner.send_with_fds(&[&m1[..]], &[]).unwrap();
        let mut back = [0u8; 12];
        assert!(recv_exact(&frontend, &mut back, &mut Vec::new()).unwrap());
        assert_eq!(back, m1);
        drop(frontend);
        let mut end = [0u8; 12];
        assert!(!recv_exact(&inner, &mut end, &mut Vec::new()).unwrap());
    }

    #[test]
    fn an_oversized_message_ends_the_relay() {
        let (frontend, daemon_end) = UnixStream::pair().unwrap();
        let mut bridge = Bridge::new(daemon_end).unwrap();
        bridge.start().unwrap();
        let inner = bridge.listener.accept().unwrap().unwrap();
        let mut m = vec![1u8, 0, 0, 0, 1, 0, 0, 0];
        m.extend_from_slice(&u32::MAX.to_le_bytes());
        frontend.send_with_fds(&[&m[..]], &[]).unwrap();
        let mut buf = [0u8; 12];
        assert!(!recv_exact(&inner, &mut buf, &mut Vec::new()).unwrap());
    }
}
