//! The life of the daemon process: one listening socket, one frontend
//! connection at a time, fresh device state for every connection.
//!
//! A frontend that goes away (QEMU quits or restarts) ends its connection;
//! the daemon forgets everything of it and accepts the next one on the same
//! socket, so a restarted VMM always finds it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gpu_backend::Device;
use gpu_backend::sim::{SimConfig, SimGpu};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DaemonConfig, DeviceModel};
use crate::metrics::{GuestMetrics, Metrics, MetricsListener};
use crate::socket::{Bridge, Endpoint, SocketSource};
use crate::virtio_gpu::{FENCE_EVENT, GpuVhostBackend, TIMER_EVENT};

/// Why the daemon could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The termination signals could not be set up.
    #[error("cannot install signal handling: {0}")]
    Signals(#[source] std::io::Error),
    /// The socket could not be created, or the inherited one is unusable.
    #[error(transparent)]
    Socket(#[from] crate::socket::SocketError),
    /// The sandbox could not be installed.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The metrics endpoint could not be set up.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The endpoint.
        addr: crate::metrics::MetricsAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why one frontend connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The device state could not be created.
    #[error("creating the device: {0}")]
    Device(#[source] std::io::Error),
    /// vhost-user-backend refused to set up.
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    /// vhost-user-backend made no vring worker.
    #[error("no vring worker")]
    NoWorker,
    /// A device event could not be registered with the vring worker.
    #[error("registering device event {event}: {source}")]
    Register {
        /// The device event.
        event: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Accepting the connection failed.
    #[error("accepting: {0}")]
    Accept(vhost_user_backend::Error),
    /// The connection ended with an error.
    #[error("{0}")]
    Serve(vhost_user_backend::Error),
}

/// Starts the daemon and serves frontends until a termination signal.
/// Returns an error if it cannot start, and `Ok` when the one frontend of a
/// connected `--fd` went away.
pub fn start_backend(config: DaemonConfig) -> Result<(), StartError> {
    // The metrics endpoint's socket and threads exist before the sandbox
    // goes on (it allows serving them, not making them).
    let metrics = match &config.metrics {
        Some(addr) => {
            let err = |source| StartError::Metrics {
                addr: addr.clone(),
                source,
            };
            let listener = MetricsListener::bind(addr).map_err(err)?;
            let metrics = Metrics::new();
            let (where_, path) = (listener.describe(), listener.path());
            crate::metrics::server::start(listener, metrics.clone()).map_err(err)?;
            log::info!("metrics on {where_}");
            Some((metrics, path))
        }
        None => None,
    };
    let sockets = config
        .socket
        .owned_path()
        .map(Path::to_path_buf)
        .into_iter()
        .chain(metrics.as_ref().and_then(|(_, p)| p.clone()))
        .collect();
    crate::signals::exit_on_termination(sockets).map_err(StartError::Signals)?;
    let metrics = metrics.map(|(m, _)| m);
    // Before the device's threads exist, so that they inherit it.
    precise_timers();
    let device: Arc<dyn Device> = match config.device {
        DeviceModel::Sim { compute_units } => SimGpu::new(SimConfig {
            compute_units: compute_units.unwrap_or(SimConfig::default().compute_units),
            ..SimConfig::default()
        }),
    };
    let factory = Connections {
        device,
        metrics: metrics.clone(),
    };
    // One listening socket for the life of the process: a frontend that
    // reconnects (QEMU restarted) always finds it. A connected --fd
    // (libvirt) has one frontend: serve it, then exit.
    let mut listener = match crate::socket::open(&config.socket)? {
        Endpoint::Listening(listener) => listener,
        Endpoint::Connected(stream) => {
            let mut bridge = Bridge::new(stream)?;
            crate::sandbox::install(config.sandbox)?;
            bridge.start()?;
            log::info!("serving the frontend on the inherited connected socket");
            if let Err(e) = serve_one(&config, &factory, &mut bridge.listener) {
                log::error!("connection ended with an error: {e}");
            }
            log::info!("frontend disconnected; exiting");
            return Ok(());
        }
    };
    log::info!("listening on {}", describe(&config.socket));
    // The sandbox goes on before the first accept: no frontend byte is read
    // outside it.
    crate::sandbox::install(config.sandbox)?;
    let mut backoff = Backoff::default();
    loop {
        match serve_one(&config, &factory, &mut listener) {
            Ok(()) => {
                backoff.succeeded();
                log::info!("frontend disconnected; waiting for the next connection");
            }
            Err(e @ ConnectionError::Serve(_)) => {
                backoff.succeeded();
                log::error!("connection ended with an error: {e}");
            }
            Err(e) => backoff.failed(&e),
        }
    }
}

/// `n` fds held open, to check that many are available.
fn reserve_fds(n: usize) -> std::io::Result<Vec<EventFd>> {
    (0..n).map(|_| EventFd::new(libc::EFD_CLOEXEC)).collect()
}

/// Waiting between failed attempts to set up a connection (out of fds or
/// threads, say): retrying at once would spin and flood the log without
/// ever getting what is missing.
#[derive(Debug, Default)]
struct Backoff {
    /// Failed attempts in a row.
    failures: u32,
}

impl Backoff {
    /// The first wait.
    const FIRST: Duration = Duration::from_millis(10);
    /// The longest wait: a frontend that connects once resources free up
    /// is served within this.
    const MAX: Duration = Duration::from_secs(1);

    /// Setting up failed: logs the 1st, 2nd, 4th, 8th... failure in a row
    /// and waits twice as long as last time (at most [`Backoff::MAX`]).
    fn failed(&mut self, e: &ConnectionError) {
        self.failures = self.failures.saturating_add(1);
        let delay = Backoff::FIRST
            .saturating_mul(1 << self.failures.saturating_sub(1).min(16))
            .min(Backoff::MAX);
        if self.failures.is_power_of_two() {
            log::error!(
                "cannot serve a connection ({} failed attempts in a row): {e}; retrying in {} ms",
                self.failures,
                delay.as_millis()
            );
        }
        std::thread::sleep(delay);
    }

    /// A connection was served.
    fn succeeded(&mut self) {
        if self.failures > 0 {
            log::info!("serving again after {} failed attempts", self.failures);
        }
        self.failures = 0;
    }
}

fn describe(source: &SocketSource) -> String {
    match source {
        SocketSource::Path(p) => p.display().to_string(),
        SocketSource::Fd(fd) => format!("the inherited socket (fd {fd})"),
    }
}

/// What every connection's device state is made from.
struct Connections {
    device: Arc<dyn Device>,
    metrics: Option<Arc<Metrics>>,
}

/// A connection's metrics: its series go when it ends, however it ends.
struct ConnectionMetrics<'a> {
    metrics: &'a Metrics,
    guest: Arc<GuestMetrics>,
}

impl Drop for ConnectionMetrics<'_> {
    fn drop(&mut self) {
        self.metrics.guest_gone(&self.guest);
    }
}

/// Serves one frontend connection with fresh device state.
fn serve_one(
    config: &DaemonConfig,
    connections: &Connections,
    listener: &mut Listener,
) -> Result<(), ConnectionError> {
    let guest = connections.metrics.as_deref().map(|m| ConnectionMetrics {
        metrics: m,
        guest: m.new_guest(),
    });
    let factory = crate::compute::factory_with_metrics(
        connections.device.clone(),
        config.compute.clone(),
        guest.as_ref().map(|g| g.guest.clone()),
    );
    let backend = Arc::new(
        GpuVhostBackend::new(&factory, config.gpu_limits).map_err(ConnectionError::Device)?,
    );
    if let Some(g) = &guest {
        g.guest.set_gpu(backend.counters());
    }
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("vhost-gpu-nc".into(), backend.clone(), mem)
        .map_err(ConnectionError::Daemon)?;
    let handler = daemon
        .get_epoll_handlers()
        .into_iter()
        .next()
        .ok_or(ConnectionError::NoWorker)?;
    for (fd, event) in [
        (backend.timer_fd(), TIMER_EVENT),
        (backend.fence_fd(), FENCE_EVENT),
    ] {
        handler
            .register_listener(fd, EventSet::IN, u64::from(event))
            .map_err(|source| ConnectionError::Register { event, source })?;
    }
    // Accepting takes one fd and starting the connection a second one: if
    // they are not there, fail (and back off) before taking a frontend's
    // connection only to drop it.
    drop(reserve_fds(2).map_err(ConnectionError::Device)?);
    daemon.start(listener).map_err(ConnectionError::Accept)?;
    if let Some(g) = &guest {
        g.metrics.guest_connected(&g.guest);
    }
    let result = daemon.wait();
    // Stop this connection's vring worker threads, then forget its state.
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    backend.teardown();
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(ConnectionError::Serve(e)),
    }
}

/// Asks the kernel to wake this thread, and every thread it creates from
/// now on, within a microsecond of its timeouts: the default timer slack
/// (50 us) would double the simulated GPU's hot doorbell period. Failure
/// only costs latency.
fn precise_timers() {
    const SLACK_NS: libc::c_ulong = 1000;
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the
    // calling thread's timer expiry (and what threads it creates inherit);
    // no memory is passed.
    let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, SLACK_NS, 0, 0, 0) };
    if r != 0 {
        log::debug!("timer slack unchanged: {}", std::io::Error::last_os_error());
    }
}
