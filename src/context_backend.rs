//! The seam between the virtio-gpu device and the native compute contexts.
//!
//! The virtio-gpu layer (`crate::virtio_gpu`) owns what virtio-gpu defines:
//! resources, their guest backing, contexts as ids, fences and the
//! virtqueues. What a context *does* with the bytes of a `SUBMIT_3D`, and
//! what a capset says, belongs to the compute layer behind the
//! [`ContextBackend`] trait (`crate::compute` implements it on top of
//! `gpu-backend`). Keeping the two apart lets each be tested alone: the
//! virtio-gpu layer against a recording implementation, the compute layer
//! without virtqueues.
//!
//! Threading: the virtio-gpu layer calls the trait from its queue worker
//! thread. The compute layer may complete held fences from any thread
//! through the [`FenceCompleter`] it was given.

use std::fmt;
use std::sync::Arc;

use gpu_backend::GuestRam;
use vm_memory::GuestAddress;

/// A virtio-gpu context id, as the guest chose it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtxId(pub u32);

/// A virtio-gpu resource id, as the guest chose it (never 0).
pub use guest_proto::ResourceId;

/// One capset as `GET_CAPSET_INFO` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsetInfo {
    /// The capset id.
    pub id: u32,
    /// The highest version the device serves.
    pub max_version: u32,
    /// Size of the payload in bytes.
    pub max_size: u32,
}

/// How the guest created a context (`CTX_CREATE`'s `context_init` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextInit {
    /// The capset id the guest asked for, `None` when `context_init` was 0
    /// (compat profile: Linux without CONTEXT_INIT, one global timeline).
    pub capset_id: Option<u32>,
}

/// What kind of resource it is; the compute layer accepts buffers only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceKind {
    /// `RESOURCE_CREATE_2D`: an image for scanout.
    Image2d,
    /// `RESOURCE_CREATE_3D` with target `PIPE_BUFFER` (compat profile).
    Buffer3d,
    /// Any other `RESOURCE_CREATE_3D` target.
    Other3d,
    /// `RESOURCE_CREATE_BLOB` with `BLOB_MEM_GUEST` (native profile).
    BlobGuest,
}

/// The guest memory behind a resource: its `ATTACH_BACKING` entries (or the
/// entries a blob was created with), in order. Every entry has been checked
/// to lie inside guest RAM when it was attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestBacking {
    /// `(guest-physical address, length)` pairs, in resource byte order.
    pub entries: Vec<(GuestAddress, u32)>,
}

impl GuestBacking {
    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.entries.iter().map(|(_, l)| u64::from(*l)).sum()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The guest-physical pieces that hold bytes `[offset, offset + len)`
    /// of the resource, in resource order, or `None` if that range is not
    /// all inside the backing. The one walk over a backing: reads, page
    /// lists and regions all go through it.
    pub fn pieces(&self, offset: u64, len: u64) -> Option<Pieces<'_>> {
        let end = offset.checked_add(len)?;
        (end <= self.len()).then(|| Pieces {
            entries: self.entries.iter(),
            skip: offset,
            left: len,
        })
    }
}

/// Iterator of [`GuestBacking::pieces`]: `(guest-physical address, bytes)`.
#[derive(Debug, Clone)]
pub struct Pieces<'a> {
    entries: std::slice::Iter<'a, (GuestAddress, u32)>,
    /// Bytes still to skip before the range starts.
    skip: u64,
    /// Bytes of the range not yet yielded.
    left: u64,
}

impl Iterator for Pieces<'_> {
    type Item = (GuestAddress, u64);

    fn next(&mut self) -> Option<(GuestAddress, u64)> {
        while self.left > 0 {
            let (addr, len) = self.entries.next()?;
            let len = u64::from(*len);
            if self.skip >= len {
                self.skip -= len;
                continue;
            }
            let n = (len - self.skip).min(self.left);
            let at = GuestAddress(addr.0.checked_add(self.skip)?);
            self.skip = 0;
            self.left -= n;
            return Some((at, n));
        }
        None
    }
}

/// A resource as the compute layer sees it when it is attached to a context.
#[derive(Clone, Debug)]
pub struct ResourceView {
    /// The resource id.
    pub id: ResourceId,
    /// Its kind.
    pub kind: ResourceKind,
    /// Its size in bytes as created (`width` for buffers, `size` for blobs).
    pub size: u64,
    /// The guest backing, `None` while none is attached.
    pub backing: Option<Arc<GuestBacking>>,
}

/// The fence a `SUBMIT_3D` carried (`VIRTIO_GPU_FLAG_FENCE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FenceRef {
    /// The context.
    pub ctx: CtxId,
    /// The fence id.
    pub fence_id: u64,
    /// The ring index, `None` without `VIRTIO_GPU_FLAG_INFO_RING_IDX`.
    pub ring_idx: Option<u8>,
}

/// What happens with a submit's fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceDisposition {
    /// Signal it now (the response is written right away).
    SignalNow,
    /// The compute layer keeps it and completes it later through the
    /// [`FenceCompleter`]; the virtio-gpu layer must not signal it (and, on
    /// the same ring, must not signal later fences before it).
    Hold,
}

/// An error the compute layer reports for a virtio-gpu command; it becomes a
/// `VIRTIO_GPU_RESP_ERR_*` response. Protocol-level errors inside a valid
/// submit are *not* errors here: they go into the guest's reply buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextBackendError {
    /// `VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID`.
    #[error("invalid context id")]
    InvalidContext,
    /// `VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER`.
    #[error("invalid parameter")]
    InvalidParameter,
    /// `VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY` (a quota was hit).
    #[error("out of memory")]
    OutOfMemory,
}

/// Completes fences the compute layer held. Callable from any thread; the
/// virtio-gpu layer wakes its queue worker and writes the responses.
pub trait FenceCompleter: Send + Sync {
    /// The held fence is done.
    fn complete(&self, fence: FenceRef);

    /// The compute layer has new device events: run
    /// [`ContextBackend::tick`] soon rather than at the next timer tick.
    fn wake(&self);
}

/// The compute contexts of one connected guest. A new instance is made for
/// every vhost-user connection (fresh state after a reconnect).
pub trait ContextBackend: Send {
    /// Capsets to report, in `GET_CAPSET_INFO` index order.
    fn capsets(&self) -> Vec<CapsetInfo>;

    /// The payload of capset `id` at `version`, `None` if not served.
    fn capset(&self, id: u32, version: u32) -> Option<Vec<u8>>;

    /// Guest RAM changed (`SET_MEM_TABLE`); called before any context use
    /// and again whenever the table changes.
    fn set_memory(&mut self, memory: GuestRam);

    /// `CTX_CREATE`. The id is new (the virtio-gpu layer rejects reuse).
    fn create_context(
        &mut self,
        ctx: CtxId,
        init: ContextInit,
        debug_name: &str,
    ) -> Result<(), ContextBackendError>;

    /// `CTX_DESTROY`, also called for every live context on disconnect.
    /// Frees everything of the context; held fences of it are completed
    /// through the completer (or dropped on disconnect).
    fn destroy_context(&mut self, ctx: CtxId);

    /// `CTX_ATTACH_RESOURCE`, and again with fresh `backing` whenever an
    /// attached resource's backing changes (`ATTACH_BACKING` after attach).
    fn attach_resource(
        &mut self,
        ctx: CtxId,
        resource: &ResourceView,
    ) -> Result<(), ContextBackendError>;

    /// `CTX_DETACH_RESOURCE`, `DETACH_BACKING` or `RESOURCE_UNREF` of a
    /// resource attached to `ctx`: the context must stop using its memory
    /// before this returns (unmap from the GPU VM, drop session regions).
    fn detach_resource(&mut self, ctx: CtxId, resource: ResourceId);

    /// `SUBMIT_3D` on a context. `commands` is the whole submitted payload.
    fn submit(
        &mut self,
        ctx: CtxId,
        commands: &[u8],
        fence: Option<FenceRef>,
    ) -> Result<FenceDisposition, ContextBackendError>;

    /// Called about every millisecond from the queue worker while
    /// [`ContextBackend::wants_tick`] says so, after every control-queue
    /// batch, and when the backend woke the worker
    /// ([`FenceCompleter::wake`]): device events, and time-based work
    /// (fault timeouts, fault backlog into rings with space again).
    fn tick(&mut self);

    /// Whether the backend has time-based work that needs the periodic
    /// [`ContextBackend::tick`]. While it has none the queue worker's timer
    /// is off, so an idle guest costs the daemon no wake-ups. The default
    /// (`true`) ticks always.
    fn wants_tick(&self) -> bool {
        true
    }
}

impl fmt::Debug for dyn ContextBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContextBackend")
    }
}

/// Makes the compute contexts for a new connection, given the completer for
/// its held fences.
pub type ContextBackendFactory =
    Arc<dyn Fn(Arc<dyn FenceCompleter>) -> Box<dyn ContextBackend> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_exactly_the_range_across_entries() {
        let b = GuestBacking {
            entries: vec![
                (GuestAddress(0x1000), 0x1000),
                (GuestAddress(0x8000), 0x100),
                (GuestAddress(0x4000), 0x2000),
            ],
        };
        let got: Vec<(u64, u64)> = b
            .pieces(0xFFE, 0x104)
            .unwrap()
            .map(|(a, n)| (a.0, n))
            .collect();
        assert_eq!(got, vec![(0x1FFE, 2), (0x8000, 0x100), (0x4000, 2)]);
        assert_eq!(
            b.pieces(0, 0x3100).unwrap().map(|p| p.1).sum::<u64>(),
            0x3100
        );
        assert!(b.pieces(0x3000, 0x101).is_none(), "past the end");
        assert!(b.pieces(u64::MAX, 2).is_none(), "wraps");
        assert_eq!(b.pieces(0x3100, 0).unwrap().count(), 0);
    }
}
