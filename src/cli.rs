//! The command line: what `vhost-gpu-nc --help` and the man page say, and
//! how it becomes a [`DaemonConfig`].
//!
//! It follows QEMU's vhost-user "backend program conventions"
//! (docs/interop/vhost-user.rst): `--socket-path` or `--fd`, and
//! `--print-capabilities`, so libvirt can discover and launch the daemon.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use guest_proto::capset::Capset;

use crate::compute::ComputeConfig;
use crate::config::{DaemonConfig, DeviceModel};
use crate::logging::LogTarget;
use crate::metrics::MetricsAddr;
use crate::sandbox::SandboxMode;
use crate::size::ByteSize;
use crate::socket::SocketSource;
use crate::virtio_gpu::device::GpuLimits;

/// What `--print-capabilities` prints: the interop spec's
/// `VHostUserBackendCapabilities` for type `gpu`. The spec's GPU features
/// are `virgl` (a `--virgl` option: a virglrenderer 3D renderer) and
/// `render-node` (a `--render-node` option: a host DRM node); this backend
/// has neither, so it lists none, and libvirt then passes neither option
/// (it would pass `--virgl` for `<acceleration accel3d='yes'/>` and
/// `--render-node=` for a configured or auto-picked render node).
pub const CAPABILITIES_JSON: &str = "{\n  \"type\": \"gpu\",\n  \"features\": []\n}\n";

const LONG_ABOUT: &str = "\
vhost-gpu-nc is a vhost-user virtio-gpu device backend that gives virtual \
machines a native context for GPU compute. QEMU (vhost-user-gpu-pci or \
vhost-user-vga) or crosvm connects to it as the guest's virtio-gpu device. \
Every guest context gets its own GPU VM on the host; guest VA ranges are \
bound into it by explicit range mappings, and recoverable GPU page faults are \
forwarded to the guest, which resolves them with its own page tables, after \
which the work replays. The device behind the contexts is the embedded \
simulated GPU.

The daemon takes its vhost-user socket in one of three ways: --socket-path \
(it binds and listens, and serves one frontend after the other, so a \
restarted QEMU finds it again), --fd (a socket its parent passes in: a \
listening socket is served like --socket-path; a connected socket, which is \
what libvirt passes, is served once and the daemon exits when the frontend \
goes away), or systemd socket activation (LISTEN_FDS=1: fd 3, the same code \
path as --fd).

Once the socket exists and before the first frontend byte is read, the \
daemon confines itself: a seccomp allowlist in every thread (opening a file \
fails with EACCES, any other system call outside the list kills it with \
SIGSYS) and no-new-privs. --sandbox=none turns that off \
for debugging.

libvirt finds the daemon through its vhost-user descriptor, \
/usr/share/qemu/vhost-user/40-vhost-gpu-nc.json (an administrator's file of \
the same name in /etc/qemu/vhost-user/ replaces it; an empty one hides it), \
runs it with --print-capabilities, and starts it with --fd=N for a domain \
whose video device has <driver name='vhostuser'/>.";

/// The EXAMPLES, DEFAULTS, EXIT STATUS, ENVIRONMENT, FILES and SEE ALSO text
/// of `--help`; the man page renders each heading as a section.
pub const AFTER_HELP: &str = "\
SIZES:
  Byte sizes take binary units: 4096, 64K, 512M, 16G, 1T (K=1024; KiB, MB and \
GiB are accepted too).

EXAMPLES:
  Listen on a socket for QEMU:
    vhost-gpu-nc --socket-path /run/vhost-gpu-nc/gpu.sock
  and start QEMU with
    -object memory-backend-memfd,id=mem,size=4G,share=on
    -machine q35,memory-backend=mem
    -chardev socket,id=vgpu,path=/run/vhost-gpu-nc/gpu.sock
    -device vhost-user-gpu-pci,chardev=vgpu

  Let guests bind 128 GiB each, with at most 16 compute contexts:
    vhost-gpu-nc --socket-path gpu.sock --max-bound-bytes 128G --max-contexts 16

  What libvirt runs (the fd is one end of a socketpair, QEMU has the other):
    vhost-gpu-nc --print-capabilities
    vhost-gpu-nc --fd=3

  Debug under strace with the sandbox off:
    strace -f vhost-gpu-nc --socket-path gpu.sock --sandbox=none --log-level debug

DEFAULTS:
  --max-bound-bytes is 64G per guest. A ROCm compute job binds its working set \
(tens of GiB on real GPUs), so a default of a few GiB would fail real jobs. \
Binding costs the host 8 bytes of page table per 4 KiB page (1/512), and 8 more \
for a binding of a guest-physical page list, so a guest at 64 GiB costs the \
host 128 to 256 MiB; guest memory itself is never copied.

METRICS:
  --metrics=unix:PATH or --metrics=tcp:127.0.0.1:PORT serves the Prometheus \
text format: per guest (connection number) and per context, faults raised, \
resolved, rejected, timed out and cancelled, the fault round-trip histogram, \
binds and unbinds, bound bytes against the quota, dispatches by status, queue \
depth, user-queue packets, copy bytes, interrupts, doorbell polls and latency, virtio-gpu \
commands and errors. Plain HTTP/1.1 GET /metrics (curl --unix-socket PATH \
http://localhost/metrics); a connection that sends nothing gets the text \
alone. The endpoint shows per-guest data to whoever can connect: the unix \
socket is mode 0600, and TCP is refused on anything but loopback. Every \
metric is described in /usr/share/doc/vhost-gpu-nc/metrics.md.

EXIT STATUS:
  0  a termination signal (SIGINT, SIGTERM) was taken, the frontend of a \
connected --fd went away, or --print-capabilities printed.
  1  the daemon could not start (socket, fd, sandbox, logging, metrics endpoint); the reason is \
logged.
  2  the command line is wrong.
  A process killed by SIGSYS made a system call outside the sandbox: a bug; \
please report it with the output of a run under --sandbox=none and strace.

ENVIRONMENT:
  RUST_LOG          log filter, overrides --log-level (e.g. \
info,vhost_gpu_nc::compute=debug).
  JOURNAL_STREAM    set by systemd for services: --log-target=auto then logs \
to the journal. Without it, auto logs to syslog when stderr is /dev/null (libvirt \
starts the daemon that way) and /dev/log exists.
  LISTEN_FDS, LISTEN_PID
                    systemd socket activation: fd 3 is the socket (used when \
neither --socket-path nor --fd is given; both are removed from the \
environment).
  XDG_RUNTIME_DIR   where the private bridge socket of a connected --fd is \
made (then removed at once); /tmp otherwise.

FILES:
  /usr/share/qemu/vhost-user/40-vhost-gpu-nc.json   vhost-user descriptor
  /etc/qemu/vhost-user/                             administrator overrides
  /lib/systemd/system/vhost-gpu-nc.socket, vhost-gpu-nc.service
                                                    socket-activated service

SEE ALSO:
  qemu-system-x86_64(1), libvirtd(8), /usr/share/doc/vhost-gpu-nc/qemu.md";

/// The device models on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The embedded simulated GPU.
    Sim,
}

/// vhost-user virtio-gpu device with native GPU compute contexts.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-gpu-nc",
    version,
    about,
    long_about = LONG_ABOUT,
    after_long_help = AFTER_HELP,
    after_help = "See --help for examples, defaults, exit status and environment."
)]
pub struct Cli {
    /// Print the vhost-user backend capabilities (JSON, QEMU's
    /// docs/interop/vhost-user.json) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Unix socket to bind and listen on; the frontend (QEMU, crosvm)
    /// connects to it. An existing socket file is replaced; the file is
    /// removed on SIGINT/SIGTERM.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// An inherited unix stream socket: listening (served like
    /// --socket-path) or connected (libvirt's socketpair end: served once,
    /// then the daemon exits). Checked before use.
    #[arg(long, value_name = "FDNUM")]
    pub fd: Option<RawFd>,

    /// The GPU behind the contexts. `sim`: the simulated GPU (page tables,
    /// TLBs, retry faults), the only device model so far.
    #[arg(long, value_enum, default_value_t = DeviceArg::Sim)]
    pub device: DeviceArg,

    /// Compute units of the simulated GPU (worker threads); default: cores.
    #[arg(long, value_name = "N")]
    pub compute_units: Option<usize>,

    /// How long a guest has to answer a forwarded fault, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = Capset::default().fault_timeout_ms)]
    pub fault_timeout_ms: u32,

    /// Compute contexts per guest.
    #[arg(long, value_name = "N", default_value_t = Capset::default().max_contexts)]
    pub max_contexts: u32,

    /// virtio-gpu resources per guest.
    #[arg(long, value_name = "N", default_value_t = GpuLimits::default().max_resources)]
    pub max_resources: u32,

    /// Bytes bound into GPU VMs per guest, over all its contexts (see
    /// DEFAULTS in --help for why 64G).
    #[arg(long, value_name = "SIZE",
          default_value_t = ByteSize(Capset::default().max_bound_bytes))]
    pub max_bound_bytes: ByteSize,

    /// Host memory for resource backing entry lists per guest (16 bytes per
    /// entry after adjacent entries are merged; 64M holds 16 GiB of
    /// scattered 4 KiB pages).
    #[arg(long, value_name = "SIZE",
          default_value_t = ByteSize(GpuLimits::default().max_backing_bytes))]
    pub max_backing_bytes: ByteSize,

    /// Host memory for copies of 2D images (scanout sources) per guest.
    #[arg(long, value_name = "SIZE",
          default_value_t = ByteSize(GpuLimits::default().max_image_bytes))]
    pub max_image_bytes: ByteSize,

    /// Faults pending per context.
    #[arg(long, value_name = "N", default_value_t = Capset::default().max_pending_faults)]
    pub max_pending_faults: u32,

    /// Dispatches queued per compute queue.
    #[arg(long, value_name = "N", default_value_t = Capset::default().max_queue_depth)]
    pub max_queue_depth: u32,

    /// Do not offer protocol 1.1's KERNEL_SVM (SVM_ATTACH/SVM_DETACH: a
    /// guest kernel resolving the faults); guests then use their
    /// user-space resolver, as with a 1.0 device.
    #[arg(long)]
    pub no_kernel_svm: bool,

    /// User-mode queues per session (SDMA and AQL rings the device reads
    /// itself, protocol 1.1); 0 turns them off.
    #[arg(long, value_name = "N", default_value_t = Capset::default().max_user_queues)]
    pub max_user_queues: u32,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Where logs go: stderr (with timestamps), the journal, syslog
    /// (/dev/log), or auto: the journal when run by systemd, syslog when
    /// stderr is /dev/null (as under libvirt) and /dev/log exists, else
    /// stderr.
    #[arg(long, value_enum, value_name = "TARGET", default_value_t = LogTarget::Auto)]
    pub log_target: LogTarget,

    /// Serve Prometheus metrics (text format, `GET /metrics`; see METRICS
    /// in --help) on a unix socket (`unix:PATH`, mode 0600) or a loopback
    /// TCP port (`tcp:127.0.0.1:PORT`, `tcp:[::1]:PORT`). Off by default.
    #[arg(long, value_name = "ENDPOINT")]
    pub metrics: Option<MetricsAddr>,

    /// The sandbox: `seccomp` (an allowlist of system calls plus
    /// no-new-privs, installed before the first frontend byte is read) or
    /// `none` (debugging only).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SandboxMode::Seccomp)]
    pub sandbox: SandboxMode,
}

/// The clap command (for the man page generator).
pub fn command() -> clap::Command {
    Cli::command()
}

impl Cli {
    /// The daemon's configuration, with `activated` the socket systemd
    /// passed (if any). Errors name the missing or conflicting options.
    pub fn into_config(self, activated: Option<RawFd>) -> Result<DaemonConfig, String> {
        let socket = match (self.socket_path, self.fd, activated) {
            (Some(p), None, _) => SocketSource::Path(p),
            (None, Some(fd), _) => {
                if fd < 0 {
                    return Err(format!("--fd={fd}: not a file descriptor"));
                }
                SocketSource::Fd(fd)
            }
            (None, None, Some(fd)) => SocketSource::Fd(fd),
            (None, None, None) => {
                return Err(
                    "one of --socket-path or --fd is required (or systemd socket \
                            activation with LISTEN_FDS=1)"
                        .into(),
                );
            }
            (Some(_), Some(_), _) => {
                return Err("--socket-path and --fd exclude each other".into());
            }
        };
        Ok(DaemonConfig {
            socket,
            device: match self.device {
                DeviceArg::Sim => DeviceModel::Sim {
                    compute_units: self.compute_units,
                },
            },
            compute: ComputeConfig {
                max_contexts: self.max_contexts,
                max_bound_bytes: self.max_bound_bytes.bytes(),
                max_pending_faults: self.max_pending_faults,
                max_queue_depth: self.max_queue_depth,
                max_user_queues: self.max_user_queues,
                fault_timeout: Duration::from_millis(u64::from(self.fault_timeout_ms)),
                kernel_svm: !self.no_kernel_svm,
                ..ComputeConfig::default()
            },
            gpu_limits: GpuLimits {
                max_resources: self.max_resources,
                max_image_bytes: self.max_image_bytes.bytes(),
                max_backing_bytes: self.max_backing_bytes.bytes(),
                ..GpuLimits::default()
            },
            sandbox: self.sandbox,
            metrics: self.metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("vhost-gpu-nc").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_clap_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn sizes_take_units() {
        let c = parse(&["--socket-path", "s", "--max-bound-bytes", "16G"])
            .into_config(None)
            .unwrap();
        assert_eq!(c.compute.max_bound_bytes, 16 << 30);
        let c = parse(&["--socket-path", "s", "--max-image-bytes=4096"])
            .into_config(None)
            .unwrap();
        assert_eq!(c.gpu_limits.max_image_bytes, 4096);
        assert!(
            Cli::try_parse_from(["x", "--socket-path", "s", "--max-bound-bytes", "16Q"]).is_err()
        );
    }

    #[test]
    fn the_default_bound_bytes_is_64_gib() {
        let c = parse(&["--socket-path", "s"]).into_config(None).unwrap();
        assert_eq!(c.compute.max_bound_bytes, 64 << 30);
        assert_eq!(c.sandbox, SandboxMode::Seccomp);
    }

    #[test]
    fn socket_sources() {
        let c = parse(&["--fd=5"]).into_config(None).unwrap();
        assert_eq!(c.socket, SocketSource::Fd(5));
        let c = parse(&[]).into_config(Some(3)).unwrap();
        assert_eq!(c.socket, SocketSource::Fd(3));
        // An explicit socket wins over an activation environment.
        let c = parse(&["--socket-path", "p"]).into_config(Some(3)).unwrap();
        assert_eq!(c.socket, SocketSource::Path("p".into()));
        assert!(
            parse(&[])
                .into_config(None)
                .unwrap_err()
                .contains("--socket-path")
        );
        assert!(parse(&["--fd=-1"]).into_config(None).is_err());
        assert!(Cli::try_parse_from(["x", "--fd=3", "--socket-path", "p"]).is_err());
    }

    #[test]
    fn metrics_endpoints_are_opt_in_and_loopback_only() {
        let c = parse(&["--socket-path", "s"]).into_config(None).unwrap();
        assert_eq!(c.metrics, None);
        let c = parse(&["--socket-path", "s", "--metrics=unix:/run/m.sock"])
            .into_config(None)
            .unwrap();
        assert_eq!(c.metrics, Some(MetricsAddr::Unix("/run/m.sock".into())));
        let c = parse(&["--socket-path", "s", "--metrics", "tcp:127.0.0.1:9464"])
            .into_config(None)
            .unwrap();
        assert_eq!(
            c.metrics,
            Some(MetricsAddr::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        let e = Cli::try_parse_from(["x", "--socket-path", "s", "--metrics=tcp:0.0.0.0:9464"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a loopback address"), "{e}");
    }

    #[test]
    fn capabilities_are_the_interop_specs_gpu_type_with_no_features() {
        // Parsed the way libvirt reads it: an object with a type string and a
        // features array of known GPU feature names.
        let s = CAPABILITIES_JSON.replace([' ', '\n'], "");
        assert_eq!(s, r#"{"type":"gpu","features":[]}"#);
    }
}
