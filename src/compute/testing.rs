//! A guest for the compute backend without virtqueues: guest RAM, a page
//! allocator and a backend on a device, with every fence the backend
//! completes recorded. The unit tests and the fuzz targets drive the
//! backend through it (feature `testing` outside the crate's own tests).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use gpu_backend::{Device, GuestRam};
use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::{ComputeBackend, ComputeConfig};
use crate::context_backend::{
    ContextBackend, ContextBackendError, CtxId, FenceCompleter, FenceRef, GuestBacking,
    ResourceKind, ResourceView,
};
use guest_proto::ResourceId;

/// The fences a backend completed, in order.
#[derive(Debug, Default)]
pub struct RecordedFences(pub Mutex<Vec<FenceRef>>);

impl FenceCompleter for RecordedFences {
    fn complete(&self, fence: FenceRef) {
        self.0.lock().push(fence);
    }

    fn wake(&self) {}
}

/// Guest RAM from address 0, a bump allocator of guest pages above 1 MiB,
/// and the backend under test.
#[derive(Debug)]
pub struct TestGuest {
    /// Guest RAM.
    pub mem: GuestRam,
    /// Size of guest RAM.
    pub ram_bytes: u64,
    next_free: u64,
    /// Fences the backend completed.
    pub fences: Arc<RecordedFences>,
    /// The backend (shared with the clients that submit to it).
    pub backend: Rc<RefCell<ComputeBackend>>,
}

impl TestGuest {
    /// `ram_bytes` of guest RAM and a backend on `device`.
    pub fn new(device: Arc<dyn Device>, config: ComputeConfig, ram_bytes: u64) -> TestGuest {
        let size = usize::try_from(ram_bytes).unwrap_or(usize::MAX);
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
            .unwrap_or_else(|e| panic!("guest RAM of {ram_bytes:#x} bytes: {e}"));
        let mem = GuestMemoryAtomic::new(mmap);
        let fences = Arc::new(RecordedFences::default());
        let mut backend = ComputeBackend::new(device, config, fences.clone());
        backend.set_memory(mem.clone());
        TestGuest {
            mem,
            ram_bytes,
            next_free: 0x10_0000,
            fences,
            backend: Rc::new(RefCell::new(backend)),
        }
    }

    /// The backend, borrowed.
    pub fn nc(&self) -> std::cell::RefMut<'_, ComputeBackend> {
        self.backend.borrow_mut()
    }

    /// `bytes` (rounded up to pages) of fresh guest memory.
    pub fn alloc(&mut self, bytes: u64) -> u64 {
        let gpa = self.next_free;
        self.next_free += bytes.next_multiple_of(4096);
        assert!(self.next_free <= self.ram_bytes, "guest RAM exhausted");
        gpa
    }

    /// A buffer resource `id` of `bytes` with fresh guest backing, attached
    /// to `ctx`; returns its guest-physical address.
    pub fn resource(&mut self, ctx: CtxId, id: u32, bytes: u64) -> u64 {
        let gpa = self.alloc(bytes);
        self.attach(ctx, id, gpa, bytes)
            .unwrap_or_else(|e| panic!("attaching resource {id}: {e}"));
        gpa
    }

    /// Attaches buffer resource `id` backed by `[gpa, gpa + bytes)` to
    /// `ctx`.
    pub fn attach(
        &mut self,
        ctx: CtxId,
        id: u32,
        gpa: u64,
        bytes: u64,
    ) -> Result<(), ContextBackendError> {
        let len = u32::try_from(bytes).map_err(|_| ContextBackendError::InvalidParameter)?;
        let view = ResourceView {
            id: ResourceId(id),
            kind: ResourceKind::Buffer3d,
            size: bytes,
            backing: Some(Arc::new(GuestBacking {
                entries: vec![(GuestAddress(gpa), len)],
            })),
        };
        self.nc().attach_resource(ctx, &view)
    }

    /// `N` bytes of guest RAM at `gpa`.
    pub fn read<const N: usize>(&self, gpa: u64) -> [u8; N] {
        let mut b = [0u8; N];
        self.mem
            .memory()
            .read_slice(&mut b, GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("reading {gpa:#x}: {e}"));
        b
    }

    /// The `u32` at `gpa`.
    pub fn u32_at(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read::<4>(gpa))
    }
}
