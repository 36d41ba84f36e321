//! The Linux guest runtime: the guest side of the protocol over the
//! virtio-gpu DRM UAPI.
//!
//! - [`client`]: one session's protocol client over any [`client::Channel`]
//!   (the render node here; an in-process backend or a test VMM in the
//!   daemon's tests).
//! - [`drm`]: the render-node ioctls.
//! - [`mmap`]: owned mappings with volatile and atomic access only.
//! - [`memory`]: pinning process memory and finding its guest-physical
//!   pages (what a user-space fault resolver can do on a stock kernel).
//! - [`procmaps`]: the process's own mappings (`/proc/self/maps`), for a
//!   resolver that owns the whole process.
//! - [`session`]: discovery, profile choice, the session's shared memory,
//!   requests and replies, queues, signals, and the fault resolver.
//!
//! Everything the device writes (replies, fault records, signals) is read
//! with the strict decoders of this crate: device memory is untrusted too.

pub mod client;
pub mod drm;
pub mod memory;
pub mod mmap;
pub mod procmaps;
pub mod session;

use std::io;

use guest_proto::Status;
use guest_proto::{DecodeError, DispatchStatus, EncodeError, GpuVa};

/// Why a guest operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// No render node serves the capset.
    #[error("no virtio-gpu render node with capset 24")]
    NoDevice,
    /// The device wrote something the decoder refused.
    #[error("device data: {0}")]
    Decode(DecodeError),
    /// A request could not be encoded.
    #[error("encoding a request: {0}")]
    Encode(EncodeError),
    /// The device answered with an error status.
    #[error("command {cmd:#x} failed: {}", status.name())]
    Status {
        /// The command.
        cmd: u32,
        /// Its status.
        status: Status,
    },
    /// A dispatch ended with an error status.
    #[error("dispatch ended {0:?} at {1}")]
    Dispatch(DispatchStatus, GpuVa),
    /// Waited too long.
    #[error("timed out waiting for the {0}")]
    Timeout(&'static str),
    /// Something inconsistent.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl GuestError {
    pub(crate) fn io(what: &'static str, source: io::Error) -> GuestError {
        GuestError::Io { what, source }
    }

    /// The protocol status, if the device answered with one.
    pub fn status(&self) -> Option<Status> {
        match self {
            GuestError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Results of the runtime.
pub type Result<T> = std::result::Result<T, GuestError>;
