//! vhost-gpu-nc: a vhost-user virtio-gpu device backend with native GPU
//! compute contexts.
//!
//! QEMU (`vhost-user-gpu-pci`) or crosvm connects to the daemon's socket and
//! drives a virtio-gpu device. Every guest context can open a compute
//! *session* (docs/protocol.md) with its own GPU VM on the host; GPU page
//! faults are forwarded to the guest, which resolves them.
//!
//! - [`virtio_gpu`]: the virtio-gpu device on vhost-user: typed control
//!   commands, resources, scanout, fences, virtqueues.
//! - [`context_backend`]: the seam between virtio-gpu contexts and what
//!   runs behind them (the [`context_backend::ContextBackend`] trait).
//! - [`compute`]: the compute backend: native-context sessions on
//!   `gpu-backend`.
//! - [`daemon`]: the process: listening socket, one connection at a time.
//! - [`socket`]: `--socket-path`, `--fd` (listening or connected), systemd
//!   socket activation.
//! - [`sandbox`]: the seccomp allowlist installed before the first
//!   frontend byte is read.
//! - [`metrics`]: the opt-in Prometheus endpoint (`--metrics`).
//! - [`cli`], [`logging`], [`size`]: the command line, log targets, byte
//!   sizes with units.
//!
//! [`start_backend`] is the whole daemon; `main.rs` only parses the command
//! line into a [`DaemonConfig`].

pub mod cli;
pub mod compute;
pub mod config;
pub mod context_backend;
pub mod daemon;
pub mod logging;
pub mod metrics;
pub mod sandbox;
mod signals;
pub mod size;
pub mod socket;
pub mod virtio_gpu;

pub use config::{DaemonConfig, DeviceModel};
pub use daemon::{StartError, start_backend};
