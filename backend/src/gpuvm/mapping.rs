//! One mapping of the GPU VM and what backs it.
//!
//! A mapping is a contiguous, page-aligned GPU VA range backed either by a
//! guest resource (from a byte offset on) or by a list of guest-physical
//! pages. Splitting a mapping never copies its page list: every piece shares
//! the same `Arc` and only remembers which window of it it uses, so a remap
//! costs the same for a 4 KiB and a 4 GiB mapping.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use guest_proto::{GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, ResourceId};

/// Guest-physical pages backing a mapping, in VA order. Cheap to clone; a
/// piece of a split mapping shares its parent's array.
#[derive(Clone)]
pub struct PageArray {
    all: Arc<[GuestPhysAddr]>,
    /// The window of `all` this list uses. Always inside `all`.
    window: Range<usize>,
}

impl PageArray {
    /// Takes ownership of `pages`.
    pub fn new(pages: Vec<GuestPhysAddr>) -> PageArray {
        let len = pages.len();
        PageArray {
            all: pages.into(),
            window: 0..len,
        }
    }

    /// The pages this list (and so the mapping it backs) uses.
    pub fn pages(&self) -> &[GuestPhysAddr] {
        self.all.get(self.window.clone()).unwrap_or(&[])
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// Whether the list has no page.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// The `count` pages from index `first` on, sharing this list's array;
    /// `None` if they are not all inside the list.
    pub fn sub_list(&self, first: usize, count: usize) -> Option<PageArray> {
        let start = self.window.start.checked_add(first)?;
        let end = start.checked_add(count)?;
        (end <= self.window.end).then(|| PageArray {
            all: Arc::clone(&self.all),
            window: start..end,
        })
    }
}

/// Two lists are equal when they hold the same pages, whatever arrays they
/// share.
impl PartialEq for PageArray {
    fn eq(&self, other: &Self) -> bool {
        self.pages() == other.pages()
    }
}

impl Eq for PageArray {}

impl fmt::Debug for PageArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        let pages = self.pages();
        let mut list = f.debug_list();
        list.entries(pages.iter().take(SHOWN));
        if pages.len() > SHOWN {
            list.entry(&format_args!("... {} pages", pages.len()));
        }
        list.finish()
    }
}

/// What a mapping's first page is backed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappingBacking {
    /// A guest resource, from byte `offset` (page-aligned) on.
    Resource {
        /// The resource.
        id: ResourceId,
        /// Byte offset of the mapping's first page in the resource.
        offset: u64,
    },
    /// Guest-physical pages, one per VA page.
    Pages(PageArray),
}

/// Where one page of a mapping lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageBacking {
    /// Byte `offset` of resource `id`.
    Resource {
        /// The resource.
        id: ResourceId,
        /// Page-aligned byte offset in the resource.
        offset: u64,
    },
    /// A guest-physical page.
    Guest(GuestPhysAddr),
}

/// A mapping of the GPU VM: `[va, va + size)` backed by `backing` with
/// `perms`. Inside a [`GpuVm`](super::GpuVm) `va` and `size` are
/// page-aligned, `size > 0`, `va + size` does not wrap, and the backing
/// holds exactly `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First byte.
    pub va: GpuVa,
    /// Length in bytes.
    pub size: u64,
    /// What backs the first page (and, contiguously, the rest).
    pub backing: MappingBacking,
    /// Permissions of every page.
    pub perms: Perms,
}

impl Mapping {
    /// One past the last byte.
    pub fn end(&self) -> GpuVa {
        GpuVa(self.va.raw().saturating_add(self.size))
    }

    /// The VA range.
    pub fn range(&self) -> Range<GpuVa> {
        self.va..self.end()
    }

    /// Whether `va` is inside the mapping.
    pub fn contains(&self, va: GpuVa) -> bool {
        self.va <= va && va < self.end()
    }

    /// The resource backing the mapping, if it is resource-backed.
    pub fn resource(&self) -> Option<ResourceId> {
        match self.backing {
            MappingBacking::Resource { id, .. } => Some(id),
            MappingBacking::Pages(_) => None,
        }
    }

    /// The part `[va, va + size)` of this mapping, with its backing moved
    /// along (resource offset advanced, page window narrowed) and the same
    /// permissions; `None` unless that range is non-empty, page-aligned and
    /// inside the mapping.
    pub fn sub_mapping(&self, va: GpuVa, size: u64) -> Option<Mapping> {
        let skip = va.raw().checked_sub(self.va.raw())?;
        let end = skip.checked_add(size)?;
        if size == 0 || end > self.size || skip % PAGE_SIZE != 0 || !size.is_multiple_of(PAGE_SIZE)
        {
            return None;
        }
        let backing = match &self.backing {
            MappingBacking::Resource { id, offset } => MappingBacking::Resource {
                id: *id,
                offset: offset.checked_add(skip)?,
            },
            MappingBacking::Pages(list) => {
                MappingBacking::Pages(list.sub_list(page_index(skip)?, page_index(size)?)?)
            }
        };
        Some(Mapping {
            va,
            size,
            backing,
            perms: self.perms,
        })
    }

    /// Where the page holding `va` is backed; `None` outside the mapping.
    pub fn page_backing(&self, va: GpuVa) -> Option<PageBacking> {
        if !self.contains(va) {
            return None;
        }
        let skip = va.page_down().raw().checked_sub(self.va.raw())?;
        match &self.backing {
            MappingBacking::Resource { id, offset } => Some(PageBacking::Resource {
                id: *id,
                offset: offset.checked_add(skip)?,
            }),
            MappingBacking::Pages(list) => list
                .pages()
                .get(page_index(skip)?)
                .map(|&page| PageBacking::Guest(page)),
        }
    }

    /// Whether this mapping already maps `req` exactly as `req` asks: it
    /// covers the whole range, with the same permissions and the backing at
    /// the matching place.
    pub(super) fn satisfies(&self, req: &MapRequest) -> bool {
        let Some(skip) = req.va.raw().checked_sub(self.va.raw()) else {
            return false;
        };
        if self.perms != req.perms || skip.checked_add(req.size).is_none_or(|e| e > self.size) {
            return false;
        }
        match (&self.backing, &req.backing) {
            (
                MappingBacking::Resource { id, offset },
                MappingBacking::Resource {
                    id: req_id,
                    offset: req_offset,
                },
            ) => id == req_id && offset.checked_add(skip) == Some(*req_offset),
            (MappingBacking::Pages(list), MappingBacking::Pages(req_list)) => {
                let (Some(first), Some(count)) = (page_index(skip), page_index(req.size)) else {
                    return false;
                };
                first
                    .checked_add(count)
                    .and_then(|end| list.pages().get(first..end))
                    .is_some_and(|mine| mine == req_list.pages())
            }
            _ => false,
        }
    }
}

/// A request to map `[va, va + size)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// First byte; page-aligned.
    pub va: GpuVa,
    /// Length in bytes; page-aligned, > 0.
    pub size: u64,
    /// The backing of the first page.
    pub backing: MappingBacking,
    /// Non-empty permissions.
    pub perms: Perms,
}

impl MapRequest {
    /// The mapping this request creates.
    pub(super) fn into_mapping(self) -> Mapping {
        Mapping {
            va: self.va,
            size: self.size,
            backing: self.backing,
            perms: self.perms,
        }
    }
}

/// Index of the page `bytes` bytes into a page-aligned range.
fn page_index(bytes: u64) -> Option<usize> {
    usize::try_from(bytes / PAGE_SIZE).ok()
}
