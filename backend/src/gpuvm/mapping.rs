//! What a GPU VA range is mapped to.

use std::sync::Arc;

use guest_proto::{GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, ResourceId};

/// A list of guest-physical pages shared by the pieces of a split mapping:
/// splitting never copies the list, each piece views its own slice.
#[derive(Clone)]
pub struct PageList {
    pages: Arc<[GuestPhysAddr]>,
    first: usize,
    len: usize,
}

impl PageList {
    /// A list owning `pages`.
    pub fn new(pages: Vec<GuestPhysAddr>) -> PageList {
        let len = pages.len();
        PageList {
            pages: pages.into(),
            first: 0,
            len,
        }
    }

    /// The pages this list covers, in VA order.
    pub fn pages(&self) -> &[GuestPhysAddr] {
        self.pages
            .get(self.first..self.first + self.len)
            .unwrap_or_default()
    }

    /// `count` pages from page `skip` on (caller checks the bounds).
    fn slice(&self, skip: usize, count: usize) -> PageList {
        PageList {
            pages: self.pages.clone(),
            first: self.first + skip,
            len: count,
        }
    }
}

impl PartialEq for PageList {
    fn eq(&self, other: &PageList) -> bool {
        self.pages() == other.pages()
    }
}

impl Eq for PageList {}

impl std::fmt::Debug for PageList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pages() {
            [] => write!(f, "[]"),
            [one] => write!(f, "[{one:?}]"),
            [first, .., last] => write!(f, "[{first:?} .. {last:?}; {}]", self.len),
        }
    }
}

/// The memory behind a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Bytes of a guest resource, from `offset` on.
    Resource {
        /// The resource.
        id: ResourceId,
        /// Byte offset of the mapping's first byte in the resource.
        offset: u64,
    },
    /// Guest-physical pages, one per GPU page.
    Pages(PageList),
}

/// A GPU VA range and what it maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First byte (page-aligned).
    pub va: GpuVa,
    /// Length in bytes (page-aligned, > 0).
    pub size: u64,
    /// The memory.
    pub backing: Backing,
    /// What the GPU may do.
    pub perms: Perms,
}

impl Mapping {
    /// First byte past the mapping.
    pub fn end(&self) -> GpuVa {
        GpuVa(self.va.raw() + self.size)
    }

    /// Whether `va` lies inside.
    pub fn contains(&self, va: GpuVa) -> bool {
        self.va <= va && va < self.end()
    }

    /// The piece `[va, va + size)` of this mapping, backing adjusted. The
    /// range must lie inside the mapping and be page-aligned.
    pub fn piece(&self, va: GpuVa, size: u64) -> Mapping {
        let skip = va.raw() - self.va.raw();
        let backing = match &self.backing {
            Backing::Resource { id, offset } => Backing::Resource {
                id: *id,
                offset: offset + skip,
            },
            Backing::Pages(list) => {
                Backing::Pages(list.slice((skip / PAGE_SIZE) as usize, (size / PAGE_SIZE) as usize))
            }
        };
        Mapping {
            va,
            size,
            backing,
            perms: self.perms,
        }
    }

    /// The resource behind the mapping, if any.
    pub fn resource(&self) -> Option<ResourceId> {
        match self.backing {
            Backing::Resource { id, .. } => Some(id),
            Backing::Pages(_) => None,
        }
    }
}

/// A request to map a range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// First byte (page-aligned).
    pub va: GpuVa,
    /// Length (page-aligned, > 0).
    pub size: u64,
    /// The memory.
    pub backing: Backing,
    /// Permissions (not empty).
    pub perms: Perms,
}
