//! Counters of the control queue, for the daemon's metrics
//! (docs/metrics.md): commands by type and error responses by code. One
//! relaxed atomic increment per command, read when the metrics are scraped.

use std::sync::atomic::{AtomicU64, Ordering};

use super::protocol::{self, *};

/// Every control-queue command type the device knows; anything else counts
/// as `unknown` (a bounded label set, whatever the guest sends).
const COMMANDS: [u32; 23] = [
    VIRTIO_GPU_CMD_GET_DISPLAY_INFO,
    VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
    VIRTIO_GPU_CMD_RESOURCE_UNREF,
    VIRTIO_GPU_CMD_SET_SCANOUT,
    VIRTIO_GPU_CMD_RESOURCE_FLUSH,
    VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D,
    VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING,
    VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING,
    VIRTIO_GPU_CMD_GET_CAPSET_INFO,
    VIRTIO_GPU_CMD_GET_CAPSET,
    VIRTIO_GPU_CMD_GET_EDID,
    VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
    VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
    VIRTIO_GPU_CMD_CTX_CREATE,
    VIRTIO_GPU_CMD_CTX_DESTROY,
    VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE,
    VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE,
    VIRTIO_GPU_CMD_RESOURCE_CREATE_3D,
    VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D,
    VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D,
    VIRTIO_GPU_CMD_SUBMIT_3D,
    VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB,
    VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
];

/// Every error response code.
const ERRORS: [u32; 6] = [
    VIRTIO_GPU_RESP_ERR_UNSPEC,
    VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY,
    VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
    VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID,
    VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID,
    VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
];

/// Control-queue commands by type and error responses by code.
#[derive(Debug, Default)]
pub struct GpuCounters {
    /// Per [`COMMANDS`] entry, then `unknown`.
    commands: [AtomicU64; COMMANDS.len() + 1],
    /// Per [`ERRORS`] entry, then any other code.
    errors: [AtomicU64; ERRORS.len() + 1],
}

impl GpuCounters {
    /// Counts one command of type `type_`, answered with the error
    /// response `error` (if it failed).
    pub fn count(&self, type_: u32, error: Option<u32>) {
        let i = COMMANDS
            .iter()
            .position(|&t| t == type_)
            .unwrap_or(COMMANDS.len());
        if let Some(c) = self.commands.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(code) = error {
            let i = ERRORS
                .iter()
                .position(|&t| t == code)
                .unwrap_or(ERRORS.len());
            if let Some(c) = self.errors.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `(command name, count)` for every command type, `unknown` last.
    pub fn commands(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        COMMANDS
            .iter()
            .map(|&t| protocol::type_name(t))
            .chain(std::iter::once("unknown"))
            .zip(self.commands.iter().map(|c| c.load(Ordering::Relaxed)))
    }

    /// `(response name, count)` for every error code, `unknown` last.
    pub fn errors(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ERRORS
            .iter()
            .map(|&t| protocol::type_name(t))
            .chain(std::iter::once("unknown"))
            .zip(self.errors.iter().map(|c| c.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_errors_are_counted_by_name_and_unknown_ones_together() {
        let c = GpuCounters::default();
        c.count(VIRTIO_GPU_CMD_SUBMIT_3D, None);
        c.count(
            VIRTIO_GPU_CMD_SUBMIT_3D,
            Some(VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER),
        );
        c.count(0xdead, Some(VIRTIO_GPU_RESP_ERR_UNSPEC));
        c.count(0xbeef, Some(0x1299));
        let cmds: Vec<_> = c.commands().filter(|(_, n)| *n > 0).collect();
        assert_eq!(cmds, vec![("SUBMIT_3D", 2), ("unknown", 2)]);
        let errs: Vec<_> = c.errors().filter(|(_, n)| *n > 0).collect();
        assert_eq!(
            errs,
            vec![
                ("ERR_UNSPEC", 1),
                ("ERR_INVALID_PARAMETER", 1),
                ("unknown", 1)
            ]
        );
    }
}
