//! What the daemon is started with.
//!
//! The command line (`cli.rs`) builds a [`DaemonConfig`]; the library never
//! parses arguments itself, so tests and other front ends start the same
//! backend with a plain value.

use crate::compute::ComputeConfig;
use crate::metrics::MetricsAddr;
use crate::sandbox::SandboxMode;
use crate::socket::SocketSource;
use crate::virtio_gpu::device::GpuLimits;

/// The device models the daemon can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceModel {
    /// The embedded simulated GPU, with this many compute units (`None`:
    /// one per host core).
    Sim {
        /// Compute units (worker threads).
        compute_units: Option<usize>,
    },
}

/// Everything [`crate::start_backend`] needs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Where the frontend connection comes from.
    pub socket: SocketSource,
    /// The GPU behind the contexts.
    pub device: DeviceModel,
    /// Settings and quotas of the compute contexts.
    pub compute: ComputeConfig,
    /// Limits of the virtio-gpu layer.
    pub gpu_limits: GpuLimits,
    /// The seccomp sandbox.
    pub sandbox: SandboxMode,
    /// Where the Prometheus metrics are served, if anywhere.
    pub metrics: Option<MetricsAddr>,
}
