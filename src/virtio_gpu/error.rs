//! Why a virtio-gpu command failed: one error type for every handler, with
//! the ids and sizes involved, and the `VIRTIO_GPU_RESP_ERR_*` it answers.

use crate::context_backend::{ContextBackendError, ResourceKind};

use super::protocol::{
    VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID, VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
    VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID, VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
    VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY, VIRTIO_GPU_RESP_ERR_UNSPEC,
};
use super::resources::BackingError;

/// A failed control or cursor command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// Fewer bytes than a `virtio_gpu_ctrl_hdr`.
    #[error("request of {len} bytes has no header")]
    NoHeader {
        /// Request length.
        len: usize,
    },
    /// A type the device does not know.
    #[error("unknown command {0:#x}")]
    UnknownCommand(u32),
    /// The request ends before its structure, entries or payload do.
    #[error("{cmd}: {got} bytes after the header, {need} needed")]
    ShortRequest {
        /// The command.
        cmd: &'static str,
        /// Bytes needed after the header.
        need: usize,
        /// Bytes there.
        got: usize,
    },
    /// A command the device does not implement.
    #[error("{cmd} is not supported")]
    Unsupported {
        /// The command.
        cmd: &'static str,
    },
    /// A command whose feature the driver did not ack.
    #[error("{cmd} needs {feature}, which the driver did not ack")]
    FeatureNotAcked {
        /// The command.
        cmd: &'static str,
        /// The feature.
        feature: &'static str,
    },
    /// No memory table yet.
    #[error("no guest memory yet")]
    NoMemory,
    /// The scanout does not exist (there is one, scanout 0).
    #[error("scanout {0} does not exist")]
    InvalidScanout(u32),
    /// The resource does not exist.
    #[error("resource {0} does not exist")]
    UnknownResource(u32),
    /// A new resource's id is 0 or taken.
    #[error("resource id {0} is 0 or in use")]
    ResourceIdTaken(u32),
    /// The context does not exist.
    #[error("context {0} does not exist")]
    UnknownContext(u32),
    /// A new context's id is 0 or taken.
    #[error("context id {0} is 0 or in use")]
    ContextIdTaken(u32),
    /// The guest has as many resources as it may.
    #[error("{max} resources already (--max-resources)")]
    TooManyResources {
        /// The limit.
        max: u32,
    },
    /// A 2D image that is empty or larger than the host copies.
    #[error("image {width}x{height} is empty or over {max} bytes")]
    ImageSize {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// Largest image in bytes.
        max: u64,
    },
    /// Host copies of 2D images would exceed the guest's total.
    #[error("host copies of images: {requested} bytes more do not fit ({used} of {max} in use)")]
    ImageQuota {
        /// Bytes asked for.
        requested: u64,
        /// Bytes in use.
        used: u64,
        /// The limit.
        max: u64,
    },
    /// A backing's entry list would exceed the guest's host memory budget.
    #[error(
        "resource {id}: {entries} backing entries ({bytes} bytes of host memory) are over the \
         budget for backing entries ({used} of {budget} bytes in use; --max-backing-bytes)"
    )]
    BackingBudget {
        /// The resource.
        id: u32,
        /// Entries after merging.
        entries: usize,
        /// Their host bytes.
        bytes: u64,
        /// Bytes in use.
        used: u64,
        /// The budget.
        budget: u64,
    },
    /// A field has a value the device does not accept.
    #[error("{cmd}: {field} {value:#x} is not valid")]
    InvalidField {
        /// The command.
        cmd: &'static str,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A rectangle outside its resource.
    #[error("resource {id}: rectangle {x},{y} {w}x{h} is outside its {width}x{height}")]
    RectOutside {
        /// The resource.
        id: u32,
        /// Left.
        x: u32,
        /// Top.
        y: u32,
        /// Width.
        w: u32,
        /// Height.
        h: u32,
        /// The resource's width.
        width: u32,
        /// The resource's height.
        height: u32,
    },
    /// A resource of the wrong kind for the command.
    #[error("{cmd}: resource {id} is a {kind:?} resource")]
    WrongKind {
        /// The command.
        cmd: &'static str,
        /// The resource.
        id: u32,
        /// What it is.
        kind: ResourceKind,
    },
    /// Memory entries that are not acceptable.
    #[error("resource {id}: backing: {source}")]
    Backing {
        /// The resource.
        id: u32,
        /// Why.
        #[source]
        source: BackingError,
    },
    /// A blob whose entries hold fewer bytes than its size.
    #[error("resource {id}: backing has {have} bytes, {need} needed")]
    BackingTooSmall {
        /// The resource.
        id: u32,
        /// Bytes needed.
        need: u64,
        /// Bytes in the entries.
        have: u64,
    },
    /// The resource has no backing.
    #[error("resource {0} has no backing")]
    NoBacking(u32),
    /// The resource has a backing already.
    #[error("resource {0} has a backing already")]
    BackingAttached(u32),
    /// A blob's backing is part of it.
    #[error("resource {0}: a blob's backing cannot be detached")]
    BlobBacking(u32),
    /// No capset at that index.
    #[error("no capset at index {0}")]
    CapsetIndex(u32),
    /// A capset or version the device does not serve.
    #[error("capset {id} version {version} is not served")]
    Capset {
        /// Capset id.
        id: u32,
        /// Version.
        version: u32,
    },
    /// The compute layer refused.
    #[error("context {ctx}: {source}")]
    Context {
        /// The context.
        ctx: u32,
        /// Why.
        #[source]
        source: ContextBackendError,
    },
}

impl GpuError {
    /// The response type the error answers with.
    pub fn response_type(&self) -> u32 {
        match self {
            GpuError::NoHeader { .. }
            | GpuError::UnknownCommand(_)
            | GpuError::Unsupported { .. }
            | GpuError::FeatureNotAcked { .. }
            | GpuError::NoMemory
            | GpuError::NoBacking(_)
            | GpuError::BackingAttached(_)
            | GpuError::BlobBacking(_) => VIRTIO_GPU_RESP_ERR_UNSPEC,
            GpuError::InvalidScanout(_) => VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
            GpuError::UnknownResource(_) | GpuError::ResourceIdTaken(_) => {
                VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID
            }
            GpuError::UnknownContext(_) | GpuError::ContextIdTaken(_) => {
                VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID
            }
            GpuError::TooManyResources { .. }
            | GpuError::ImageQuota { .. }
            | GpuError::BackingBudget { .. } => VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY,
            GpuError::ShortRequest { .. }
            | GpuError::ImageSize { .. }
            | GpuError::InvalidField { .. }
            | GpuError::RectOutside { .. }
            | GpuError::WrongKind { .. }
            | GpuError::Backing { .. }
            | GpuError::BackingTooSmall { .. }
            | GpuError::CapsetIndex(_)
            | GpuError::Capset { .. } => VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
            GpuError::Context { source, .. } => match source {
                ContextBackendError::InvalidContext => VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID,
                ContextBackendError::InvalidParameter => VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
                ContextBackendError::OutOfMemory => VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY,
            },
        }
    }
}
