//! The resources attached to one context, as its GPU VM may use them.
//!
//! Isolation rests here: a session resolves resource ids only through its
//! own context's attachments, so another context's ids are simply unknown.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpu_backend::context::{ContextError, ResourceMemory};
use gpu_backend::gpuvm::ResourceSizes;
use guest_proto::{GuestPhysAddr, ResourceId};

use super::region::{RegionError, backing_pages};
use crate::context_backend::{GuestBacking, ResourceKind, ResourceView};

/// Resources attached to a context.
#[derive(Debug, Default)]
pub struct Resources {
    attached: BTreeMap<ResourceId, ResourceView>,
}

impl Resources {
    /// Adds or replaces an attachment; returns the previous view.
    pub fn attach(&mut self, view: ResourceView) -> Option<ResourceView> {
        self.attached.insert(view.id, view)
    }

    /// Removes an attachment.
    pub fn detach(&mut self, id: ResourceId) -> Option<ResourceView> {
        self.attached.remove(&id)
    }

    /// The guest backing of a buffer resource attached here.
    pub fn backing(&self, id: ResourceId) -> Option<Arc<GuestBacking>> {
        let view = self.attached.get(&id)?;
        match view.kind {
            ResourceKind::Buffer3d | ResourceKind::BlobGuest => view.backing.clone(),
            ResourceKind::Image2d | ResourceKind::Other3d => None,
        }
    }
}

impl ResourceSizes for Resources {
    /// What the guest may map: the backing, but never more than the size
    /// it created the resource with (rounded up to whole pages).
    fn resource_size(&self, id: ResourceId) -> Option<u64> {
        let view = self.attached.get(&id)?;
        let backing = self.backing(id).filter(|b| !b.is_empty())?;
        let created = view.size.checked_next_multiple_of(guest_proto::PAGE_SIZE)?;
        Some(backing.len().min(created))
    }
}

impl ResourceMemory for Resources {
    fn pages(
        &self,
        id: ResourceId,
        offset: u64,
        count: usize,
        out: &mut Vec<GuestPhysAddr>,
    ) -> Result<(), ContextError> {
        let backing = self.backing(id).ok_or(ContextError::UnknownResource(id))?;
        let mut addrs = Vec::with_capacity(count);
        backing_pages(&backing, offset, count, &mut addrs).map_err(|e| match e {
            RegionError::Unaligned(_) => ContextError::UnalignedBacking(id),
            RegionError::OutOfRange { .. }
            | RegionError::NotGuestRam(_)
            | RegionError::Outside { .. }
            | RegionError::Memory(_) => ContextError::BeyondResource {
                id,
                offset,
                len: (count as u64).saturating_mul(guest_proto::PAGE_SIZE),
            },
        })?;
        out.extend(addrs.into_iter().map(|a| GuestPhysAddr(a.0)));
        Ok(())
    }
}
