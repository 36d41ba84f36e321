//! The `vhost-gpu-nc` command: parses the command line and starts the
//! backend (see the library's `start_backend`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use guest_proto::capset::Capset;
use vhost_gpu_nc::compute::ComputeConfig;
use vhost_gpu_nc::virtio_gpu::device::GpuLimits;
use vhost_gpu_nc::{DaemonConfig, DeviceModel};

/// The device models on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DeviceArg {
    /// The embedded simulated GPU.
    Sim,
}

/// vhost-user virtio-gpu device with native GPU compute contexts.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Unix socket to listen on; the frontend (QEMU, crosvm) connects to it.
    #[arg(long)]
    socket_path: PathBuf,

    /// The GPU behind the contexts. `sim`: the simulated GPU (page tables,
    /// TLBs, retry faults), the only device model so far.
    #[arg(long, value_enum, default_value_t = DeviceArg::Sim)]
    device: DeviceArg,

    /// Compute units of the simulated GPU (worker threads); default: cores.
    #[arg(long)]
    compute_units: Option<usize>,

    /// How long a guest has to answer a forwarded fault, in milliseconds.
    #[arg(long, default_value_t = Capset::default().fault_timeout_ms)]
    fault_timeout_ms: u32,

    /// Compute contexts per guest.
    #[arg(long, default_value_t = Capset::default().max_contexts)]
    max_contexts: u32,

    /// virtio-gpu resources per guest.
    #[arg(long, default_value_t = GpuLimits::default().max_resources)]
    max_resources: u32,

    /// Host memory for resource backing entry lists per guest (16 bytes per
    /// entry after adjacent entries are merged).
    #[arg(long, default_value_t = GpuLimits::default().max_backing_bytes)]
    max_backing_bytes: u64,

    /// Bytes bound into GPU VMs per guest, over all its contexts.
    #[arg(long, default_value_t = Capset::default().max_bound_bytes)]
    max_bound_bytes: u64,

    /// Faults pending per context.
    #[arg(long, default_value_t = Capset::default().max_pending_faults)]
    max_pending_faults: u32,

    /// Dispatches queued per compute queue.
    #[arg(long, default_value_t = Capset::default().max_queue_depth)]
    max_queue_depth: u32,

    /// User-mode queues (SDMA and AQL rings the device reads itself,
    /// protocol 1.1) per session; 0 turns them off.
    #[arg(long, default_value_t = Capset::default().max_user_queues)]
    max_user_queues: u32,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
}

impl From<Cli> for DaemonConfig {
    fn from(cli: Cli) -> DaemonConfig {
        DaemonConfig {
            socket_path: cli.socket_path,
            device: match cli.device {
                DeviceArg::Sim => DeviceModel::Sim {
                    compute_units: cli.compute_units,
                },
            },
            compute: ComputeConfig {
                max_contexts: cli.max_contexts,
                max_bound_bytes: cli.max_bound_bytes,
                max_pending_faults: cli.max_pending_faults,
                max_queue_depth: cli.max_queue_depth,
                max_user_queues: cli.max_user_queues,
                fault_timeout: Duration::from_millis(u64::from(cli.fault_timeout_ms)),
                ..ComputeConfig::default()
            },
            gpu_limits: GpuLimits {
                max_resources: cli.max_resources,
                max_backing_bytes: cli.max_backing_bytes,
                ..GpuLimits::default()
            },
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = env_logger::Env::default().default_filter_or(cli.log_level.as_str());
    env_logger::Builder::from_env(env).init();
    match vhost_gpu_nc::start_backend(cli.into()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
