//! Where log records go: stderr with timestamps (interactive use, libvirt's
//! per-domain log file), the systemd journal (run as a service), or the
//! local syslog socket.
//!
//! `auto` picks the journal when stderr is the journal's stream
//! (`JOURNAL_STREAM`, as systemd sets it for services); syslog when stderr
//! is `/dev/null` or closed and `/dev/log` exists (libvirt starts a
//! vhost-user GPU backend daemonized, with stdio on `/dev/null`); stderr
//! otherwise.
//! The level filter is the same everywhere: `--log-level`, or `RUST_LOG`
//! (env_logger syntax, e.g. `info,vhost_gpu_nc::compute=debug`).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// Log destinations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal when stderr is connected to it (`JOURNAL_STREAM`);
    /// syslog when stderr goes nowhere (`/dev/null`, closed) and `/dev/log`
    /// exists; else stderr.
    Auto,
    /// stderr, one line per record with an RFC 3339 timestamp.
    Stderr,
    /// The systemd journal's native protocol, with priority, module, file
    /// and line as fields.
    Journal,
    /// The local syslog socket `/dev/log` (facility daemon).
    Syslog,
}

/// The journal's native socket.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// The local syslog socket.
const SYSLOG_SOCKET: &str = "/dev/log";
/// The identifier records carry in the journal and syslog.
const IDENT: &str = "vhost-gpu-nc";

/// Installs the global logger. `level` is the default filter; `RUST_LOG`
/// replaces it. Returns the target actually used.
pub fn init(target: LogTarget, level: &str) -> Result<LogTarget, String> {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| level.to_owned());
    let target = match target {
        LogTarget::Auto if systemd_journal_logger::connected_to_journal() => LogTarget::Journal,
        LogTarget::Auto if stderr_goes_nowhere() && Path::new(SYSLOG_SOCKET).exists() => {
            LogTarget::Syslog
        }
        LogTarget::Auto => LogTarget::Stderr,
        t => t,
    };
    match target {
        LogTarget::Auto | LogTarget::Stderr => {
            env_logger::Builder::new()
                .parse_filters(&spec)
                .format_timestamp_micros()
                .target(env_logger::Target::Stderr)
                .try_init()
                .map_err(|e| e.to_string())?;
        }
        LogTarget::Journal => {
            if !Path::new(JOURNAL_SOCKET).exists() {
                return Err(format!(
                    "--log-target=journal: no journal ({JOURNAL_SOCKET} is missing)"
                ));
            }
            let journal = systemd_journal_logger::JournalLog::new()
                .map_err(|e| format!("--log-target=journal: {e}"))?
                .with_syslog_identifier(IDENT.into());
            install(journal, &spec)?;
        }
        LogTarget::Syslog => {
            let syslog = Syslog::connect(Path::new(SYSLOG_SOCKET))
                .map_err(|e| format!("--log-target=syslog: {SYSLOG_SOCKET}: {e}"))?;
            install(syslog, &spec)?;
        }
    }
    Ok(target)
}

/// stderr is closed or `/dev/null` (character device 1:3).
fn stderr_goes_nowhere() -> bool {
    // SAFETY: fstat only writes into `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer; a closed fd 2 only yields EBADF.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return true;
    }
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
}

fn install<L: log::Log + 'static>(inner: L, spec: &str) -> Result<(), String> {
    let filter = env_filter::Builder::new().parse(spec).build();
    log::set_max_level(filter.filter());
    log::set_boxed_logger(Box::new(Filtered { filter, inner })).map_err(|e| e.to_string())
}

/// A logger behind an env_logger-style filter.
struct Filtered<L> {
    filter: env_filter::Filter,
    inner: L,
}

impl<L: log::Log> log::Log for Filtered<L> {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.filter.matches(record) {
            self.inner.log(record);
        }
    }
    fn flush(&self) {
        self.inner.flush();
    }
}

/// The local syslog protocol as syslog(3) speaks it:
/// `<PRI>ident[pid]: message` on a datagram socket; the syslog daemon (or
/// journald behind `/dev/log`) adds the time stamp and host.
#[derive(Debug)]
pub struct Syslog {
    sock: UnixDatagram,
    pid: u32,
}

impl Syslog {
    /// Connects to the syslog socket at `path` (the socket is opened once, at
    /// start-up, before the sandbox closes the door on new sockets).
    pub fn connect(path: &Path) -> io::Result<Syslog> {
        let sock = UnixDatagram::unbound()?;
        sock.connect(path)?;
        Ok(Syslog {
            sock,
            pid: std::process::id(),
        })
    }

    /// One record as a datagram.
    pub fn format(&self, record: &log::Record<'_>) -> String {
        // Facility daemon (3), severity from the level.
        let severity = match record.level() {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            log::Level::Debug | log::Level::Trace => 7,
        };
        format!(
            "<{}>{IDENT}[{}]: {} {}: {}",
            3 * 8 + severity,
            self.pid,
            record.level(),
            record.target(),
            record.args()
        )
    }
}

impl log::Log for Syslog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        // A full or absent syslog daemon must not stop the device.
        let _ = self.sock.send(self.format(record).as_bytes());
    }
    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use log::Log;

    #[test]
    fn syslog_datagrams_carry_priority_ident_and_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).unwrap();
        let s = Syslog::connect(&path).unwrap();
        let logger = Filtered {
            filter: env_filter::Builder::new().parse("warn").build(),
            inner: s,
        };
        let rec = |level| {
            log::Record::builder()
                .level(level)
                .target("vhost_gpu_nc::daemon")
                .args(format_args!("frontend gone"))
                .build()
        };
        logger.log(&rec(log::Level::Info)); // filtered out
        logger.log(&rec(log::Level::Error));
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        let got = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(
            got,
            format!(
                "<27>vhost-gpu-nc[{}]: ERROR vhost_gpu_nc::daemon: frontend gone",
                std::process::id()
            )
        );
        server.set_nonblocking(true).unwrap();
        assert!(
            server.recv(&mut buf).is_err(),
            "the info record passed the filter"
        );
    }
}
