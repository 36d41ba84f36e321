//! vhost-gpu-nc: a vhost-user virtio-gpu device backend with native GPU
//! compute contexts.
//!
//! The daemon listens on a unix socket; QEMU (`vhost-user-gpu-pci`) or
//! crosvm connects and drives the device. When the frontend goes away the
//! daemon forgets everything of that connection and waits for the next one.

mod compute;
mod config;
mod gpu;
mod native;

use std::sync::Arc;

use clap::Parser;
use gpu_backend::sim::{SimConfig, SimGpu};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use config::Config;
use gpu::{FENCE_EVENT, GpuVhostBackend, TIMER_EVENT};

fn main() {
    let config = Config::parse();
    init_logging(&config);
    if let Err(e) = signals::exit_on_termination(config.socket_path.clone()) {
        log::error!("cannot install signal handling: {e}");
        std::process::exit(1);
    }
    let device = match config.device {
        config::DeviceModel::Sim => SimGpu::new(SimConfig {
            compute_units: config
                .compute_units
                .unwrap_or(SimConfig::default().compute_units),
            ..SimConfig::default()
        }),
    };
    let factory = native::factory(device, config.native());
    // One listening socket for the life of the process: a frontend that
    // reconnects (QEMU restarted) always finds it.
    let mut listener = match Listener::new(&config.socket_path, true) {
        Ok(l) => l,
        Err(e) => {
            log::error!("cannot listen on {}: {e}", config.socket_path.display());
            std::process::exit(1);
        }
    };
    log::info!("listening on {}", config.socket_path.display());
    loop {
        if let Err(e) = serve_one(&config, &factory, &mut listener) {
            log::error!("connection ended with an error: {e}");
        }
        log::info!("frontend disconnected; waiting for the next connection");
    }
}

fn init_logging(config: &Config) {
    let env = env_logger::Env::default().default_filter_or(config.log_level.as_str());
    env_logger::Builder::from_env(env).init();
}

/// Serves one frontend connection with fresh device state.
fn serve_one(
    config: &Config,
    factory: &compute::ComputeFactory,
    listener: &mut Listener,
) -> Result<(), String> {
    let backend = Arc::new(
        GpuVhostBackend::new(factory, config.gpu_limits()).map_err(|e| format!("device: {e}"))?,
    );
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("vhost-gpu-nc".into(), backend.clone(), mem)
        .map_err(|e| format!("vhost-user daemon: {e}"))?;
    let handler = daemon
        .get_epoll_handlers()
        .into_iter()
        .next()
        .ok_or("no vring worker")?;
    for (fd, event) in [
        (backend.timer_fd(), TIMER_EVENT),
        (backend.fence_fd(), FENCE_EVENT),
    ] {
        handler
            .register_listener(fd, EventSet::IN, u64::from(event))
            .map_err(|e| format!("registering event {event}: {e}"))?;
    }
    daemon
        .start(listener)
        .map_err(|e| format!("accepting: {e}"))?;
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
        Err(e) => Err(e.to_string()),
    }
}

mod signals {
    //! SIGINT/SIGTERM: remove the socket and exit 0.
    //!
    //! The signals are blocked in every thread and taken by one thread with
    //! `sigwait`, so nothing runs in signal-handler context.

    use std::io;
    use std::path::PathBuf;

    pub fn exit_on_termination(socket: PathBuf) -> io::Result<()> {
        // SAFETY: `set` is a plain value initialised by sigemptyset before
        // use; the calls only read and write it and the thread's mask.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            set
        };
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is a valid signal set and `sig` a valid
                // out-pointer for the duration of the call.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                if rc == 0 {
                    log::info!("signal {sig}: exiting");
                    let _ = std::fs::remove_file(&socket);
                    std::process::exit(0);
                }
            })?;
        Ok(())
    }
}
