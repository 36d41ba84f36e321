//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use guest_proto::capset::Capset;

use crate::gpu::device::GpuLimits;
use crate::native::NativeConfig;

/// The device models the daemon can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceModel {
    /// The embedded simulated GPU.
    Sim,
}

/// vhost-user virtio-gpu device with native GPU compute contexts.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Config {
    /// Unix socket to listen on; the frontend (QEMU, crosvm) connects to it.
    #[arg(long)]
    pub socket_path: PathBuf,

    /// The GPU behind the contexts. `sim`: the simulated GPU (page tables,
    /// TLBs, retry faults), the only device model so far.
    #[arg(long, value_enum, default_value_t = DeviceModel::Sim)]
    pub device: DeviceModel,

    /// Compute units of the simulated GPU (worker threads); default: cores.
    #[arg(long)]
    pub compute_units: Option<usize>,

    /// How long a guest has to answer a forwarded fault, in milliseconds.
    #[arg(long, default_value_t = Capset::default().fault_timeout_ms)]
    pub fault_timeout_ms: u32,

    /// Compute contexts per guest.
    #[arg(long, default_value_t = Capset::default().max_contexts)]
    pub max_contexts: u32,

    /// virtio-gpu resources per guest.
    #[arg(long, default_value_t = GpuLimits::default().max_resources)]
    pub max_resources: u32,

    /// Bytes bound into GPU VMs per guest, over all its contexts.
    #[arg(long, default_value_t = Capset::default().max_bound_bytes)]
    pub max_bound_bytes: u64,

    /// Faults pending per context.
    #[arg(long, default_value_t = Capset::default().max_pending_faults)]
    pub max_pending_faults: u32,

    /// Dispatches queued per compute queue.
    #[arg(long, default_value_t = Capset::default().max_queue_depth)]
    pub max_queue_depth: u32,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

impl Config {
    /// Settings of the compute layer.
    pub fn native(&self) -> NativeConfig {
        NativeConfig {
            max_contexts: self.max_contexts,
            max_bound_bytes: self.max_bound_bytes,
            max_pending_faults: self.max_pending_faults,
            max_queue_depth: self.max_queue_depth,
            fault_timeout: Duration::from_millis(u64::from(self.fault_timeout_ms)),
            ..NativeConfig::default()
        }
    }

    /// Limits of the virtio-gpu layer.
    pub fn gpu_limits(&self) -> GpuLimits {
        GpuLimits {
            max_resources: self.max_resources,
            ..GpuLimits::default()
        }
    }
}
