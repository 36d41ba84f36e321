//! The GPU VM range manager: what is mapped where in one guest context's GPU
//! virtual address space.
//!
//! # Model
//!
//! This is bookkeeping only, identical for every device, and follows Linux's
//! `drm_gpuvm` (drivers/gpu/drm/drm_gpuvm.c, "Split and merge"). A VM holds
//! non-overlapping [`Mapping`]s. A map request over existing mappings
//! *replaces* what it covers, an unmap request removes it, and both are
//! first turned into a [`Plan`]: a list of [`Op`]s in ascending VA order,
//!
//! - one [`Op::Unmap`] for every existing mapping the request covers whole;
//! - one [`Op::Remap`] for every mapping the request covers only in part:
//!   the mapping goes and its uncovered `prev` and/or `next` pieces stay,
//!   their backing moved along (resource offset advanced, page-list window
//!   narrowed). Only the mappings at the two ends of the request can be cut,
//!   so there are at most two remaps (one with both pieces when the request
//!   falls inside a single mapping);
//! - for a map request, last, exactly one [`Op::Map`]: the new mapping.
//!
//! Like `drm_gpuvm`, neighbours are never merged: a new mapping next to (or
//! over part of) a mapping of the same backing stays a mapping of its own.
//! One mapping per request keeps every later unmap or remap exact, and
//! merging would buy nothing the device needs.
//!
//! ## The one special case: a request that is already satisfied
//!
//! `drm_gpuvm` documents that a request for a mapping that "already exists
//! in the exact same way" may produce no operation, but its code emits an
//! unmap (with a "keep" hint) and a map for the identical case (1 of its
//! table), and splits the old mapping with "keep" hints for requests inside
//! it with the same BO at the matching offset (cases 6, 8 and 12). Here a
//! map request that one existing mapping already satisfies — it covers the
//! whole range, has the same permissions, and its backing at that place is
//! exactly the requested backing (same resource at the same offset, or the
//! same guest pages) — yields an **empty plan** and changes nothing. The
//! reason is the fault path: guest resolvers racing on duplicate faults
//! re-bind memory that is already bound, and a plan that tears down and
//! rebuilds translations would open a window in which running GPU work
//! faults again on pages that were fine. Page for page the result is the
//! one `drm_gpuvm` describes; only the bookkeeping keeps one mapping where
//! `drm_gpuvm` would keep two or three adjacent pieces.
//!
//! # Prepare, then commit
//!
//! Preparing validates the request against the layout, the alignment and
//! the backing, computes the plan and changes nothing. The caller applies the
//! plan to the device's page tables and then [`Plan::commit`]s it, which
//! cannot fail; if the device fails it drops the plan instead, and the
//! bookkeeping still describes what it described before. This is why no
//! device error can leave the range manager half-changed, and why the plan
//! borrows the VM mutably: nothing can change the VM between the two steps,
//! so the plan is still exact when it is committed.
//!
//! # Address space layout
//!
//! The guest binds only inside the aperture ([`VaLayout::aperture`]); the
//! reserved range ([`VaLayout::reserved`]) belongs to the daemon, which maps
//! session memory there with [`GpuVm::prepare_map_reserved`].
//! [`GpuVm::bound_bytes`] counts aperture mappings only: it is what the
//! guest's bound-bytes quota is charged for.
//!
//! # Range attributes
//!
//! [`EffectiveAttrs`] are fault policy for a range ([`GpuVm::set_attrs`]). They
//! split over ranges like mappings, merge when neighbours become equal, and
//! are independent of mappings, as `madvise` is of `mmap`.

mod attrs;
mod mapping;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use guest_proto::capset::{
    DEFAULT_APERTURE_END, DEFAULT_APERTURE_START, DEFAULT_RESERVED_END, DEFAULT_RESERVED_START,
};
use guest_proto::{GpuVa, PAGE_SIZE, ResourceId};

pub use attrs::{AttrUpdate, EffectiveAttrs};
pub use mapping::{MapRequest, Mapping, MappingBacking, PageArray, PageBacking};

use attrs::AttrMap;

/// The address space layout of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaLayout {
    /// Where the guest may bind.
    pub aperture: Range<GpuVa>,
    /// Where only the daemon maps (session memory).
    pub reserved: Range<GpuVa>,
}

impl VaLayout {
    /// The layout of `docs/protocol.md`, as the capset reports it: aperture
    /// `[64 KiB, 2^47)`, reserved `[2^47, 2^48)`.
    pub fn protocol_default() -> VaLayout {
        VaLayout {
            aperture: DEFAULT_APERTURE_START..DEFAULT_APERTURE_END,
            reserved: DEFAULT_RESERVED_START..DEFAULT_RESERVED_END,
        }
    }

    fn in_aperture(&self, va: GpuVa) -> bool {
        self.aperture.contains(&va)
    }
}

/// The sizes of the resources a VM may map.
pub trait ResourceSizes {
    /// Size in bytes of resource `id`; `None` if this context has no such
    /// resource.
    fn resource_size(&self, id: ResourceId) -> Option<u64>;
}

/// Why a request was refused. A refused request changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GpuVmError {
    /// A range of zero bytes.
    #[error("range at {0} has zero size")]
    ZeroSize(GpuVa),
    /// `va + size` (or `offset + size`) wraps around 2^64.
    #[error("{what} {start:#x} + size {size:#x} wraps around 2^64")]
    Overflow {
        /// Which start: "va" or "offset".
        what: &'static str,
        /// The start.
        start: u64,
        /// The length.
        size: u64,
    },
    /// The range is not inside the aperture.
    #[error("range {va} + {size:#x} is not inside the aperture {start}..{end}")]
    OutsideAperture {
        /// Start of the range.
        va: GpuVa,
        /// Its length.
        size: u64,
        /// Start of the aperture.
        start: GpuVa,
        /// End of the aperture.
        end: GpuVa,
    },
    /// A guest request touches the daemon's reserved range, or a daemon
    /// mapping is not inside it.
    #[error("range {va} + {size:#x} crosses the reserved range {start}..{end}")]
    Reserved {
        /// Start of the range.
        va: GpuVa,
        /// Its length.
        size: u64,
        /// Start of the reserved range.
        start: GpuVa,
        /// End of the reserved range.
        end: GpuVa,
    },
    /// A value that must be a multiple of the page size is not.
    #[error("{what} {value:#x} is not page aligned")]
    Misaligned {
        /// Which value: "va", "size", "offset" or "page".
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// The context has no such resource.
    #[error("unknown resource {0:?}")]
    UnknownResource(ResourceId),
    /// The mapping would reach past the end of its resource.
    #[error(
        "offset {offset:#x} + size {size:#x} is past the end of {id:?} ({resource_size:#x} bytes)"
    )]
    BeyondBacking {
        /// The resource.
        id: ResourceId,
        /// Offset in it.
        offset: u64,
        /// Length of the mapping.
        size: u64,
        /// Size of the resource.
        resource_size: u64,
    },
    /// A page list that does not hold one page per page of the range.
    #[error("{actual} pages given for a range of {expected} pages")]
    PageCount {
        /// Pages the range needs.
        expected: u64,
        /// Pages given.
        actual: u64,
    },
    /// A mapping without any permission.
    #[error("a mapping needs at least one permission")]
    EmptyPerms,
    /// A fault granule shift outside 12 ..= 30.
    #[error("granule shift {0} is outside 12..=30")]
    BadGranule(u8),
}

/// One step of a [`Plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Add a mapping over a range that the plan's earlier ops have emptied.
    Map(Mapping),
    /// Remove `unmap`, keeping its pieces `prev` (before the request) and
    /// `next` (after it) with their backing moved along. At least one of
    /// the two is present.
    Remap {
        /// The mapping to remove.
        unmap: Mapping,
        /// Its part before the request's range.
        prev: Option<Mapping>,
        /// Its part after the request's range.
        next: Option<Mapping>,
    },
    /// Remove a mapping the request covers whole.
    Unmap(Mapping),
}

/// The operations a request needs, not yet applied to the VM. Commit it once
/// the device has applied them; drop it to leave the VM as it is. It
/// borrows the VM mutably, so the VM cannot change in between.
pub struct Plan<'vm> {
    vm: &'vm mut GpuVm,
    ops: Vec<Op>,
}

impl Plan<'_> {
    /// The operations, in ascending VA order, unmaps and remaps before the
    /// map.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Whether nothing is to be done.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// What [`GpuVm::bound_bytes`] will be after the commit.
    pub fn bound_bytes_after(&self) -> u64 {
        let layout = &self.vm.layout;
        let bytes = |m: &Mapping| if layout.in_aperture(m.va) { m.size } else { 0 };
        let some = |m: &Option<Mapping>| m.as_ref().map_or(0, bytes);
        self.ops
            .iter()
            .fold(self.vm.bound_bytes, |total, op| match op {
                Op::Map(m) => total.saturating_add(bytes(m)),
                Op::Remap { unmap, prev, next } => total
                    .saturating_sub(bytes(unmap))
                    .saturating_add(some(prev))
                    .saturating_add(some(next)),
                Op::Unmap(m) => total.saturating_sub(bytes(m)),
            })
    }

    /// Applies the plan to the VM. Cannot fail.
    pub fn commit(mut self) {
        let mut ops = std::mem::take(&mut self.ops);
        for op in ops.drain(..) {
            self.vm.apply(op);
        }
        self.ops = ops;
    }
}

/// Largest op buffer a VM keeps for the next plan: enough for any ordinary
/// bind, small enough that one huge unmap does not pin its memory.
const SPARE_OPS_CAPACITY: usize = 16;

/// Hands the (now empty or abandoned) op buffer back to the VM, so the next
/// plan does not allocate.
impl Drop for Plan<'_> {
    fn drop(&mut self) {
        if self.ops.capacity() <= SPARE_OPS_CAPACITY {
            self.ops.clear();
            self.vm.spare_ops = std::mem::take(&mut self.ops);
        }
    }
}

impl fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan").field("ops", &self.ops).finish()
    }
}

/// The range manager of one GPU VM.
#[derive(Clone, Debug)]
pub struct GpuVm {
    layout: VaLayout,
    /// Mappings by start VA; they never overlap.
    mappings: BTreeMap<u64, Mapping>,
    /// Total size of the aperture mappings.
    bound_bytes: u64,
    attrs: AttrMap,
    /// The op buffer of the last plan, kept to be reused.
    spare_ops: Vec<Op>,
}

/// Which part of the layout a request may touch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Area {
    Aperture,
    Reserved,
}

impl GpuVm {
    /// An empty VM.
    pub fn new(layout: VaLayout) -> GpuVm {
        GpuVm {
            layout,
            mappings: BTreeMap::new(),
            bound_bytes: 0,
            attrs: AttrMap::default(),
            spare_ops: Vec::new(),
        }
    }

    /// The layout the VM was created with.
    pub fn layout(&self) -> &VaLayout {
        &self.layout
    }

    /// Plans a guest map request in the aperture.
    pub fn prepare_map(
        &mut self,
        req: MapRequest,
        res: &dyn ResourceSizes,
    ) -> Result<Plan<'_>, GpuVmError> {
        self.prepare_map_in(Area::Aperture, req, res)
    }

    /// Plans a daemon map request in the reserved range (session memory).
    pub fn prepare_map_reserved(
        &mut self,
        req: MapRequest,
        res: &dyn ResourceSizes,
    ) -> Result<Plan<'_>, GpuVmError> {
        self.prepare_map_in(Area::Reserved, req, res)
    }

    /// Plans removing whatever is mapped in `[va, va + size)` of the
    /// aperture. A range where nothing is mapped gives an empty plan (not an
    /// error, as in `docs/protocol.md`); a zero size is refused like
    /// everywhere else.
    pub fn prepare_unmap(&mut self, va: GpuVa, size: u64) -> Result<Plan<'_>, GpuVmError> {
        let end = self.check_range(Area::Aperture, va, size)?;
        let mut ops = self.take_ops();
        self.cut(va.raw(), end, &mut ops);
        Ok(Plan { vm: self, ops })
    }

    /// Plans removing every mapping backed by resource `id`, in the aperture
    /// and the reserved range (the resource is going away). Walks every
    /// mapping: resource teardown is rare, binds are not.
    pub fn prepare_unmap_resource(&mut self, id: ResourceId) -> Plan<'_> {
        let mut ops = self.take_ops();
        ops.extend(
            self.mappings
                .values()
                .filter(|m| m.resource() == Some(id))
                .map(|m| Op::Unmap(m.clone())),
        );
        Plan { vm: self, ops }
    }

    /// Forgets every mapping and attribute (teardown) and returns the
    /// mappings, in VA order.
    pub fn clear(&mut self) -> Vec<Mapping> {
        self.bound_bytes = 0;
        self.attrs.clear();
        std::mem::take(&mut self.mappings).into_values().collect()
    }

    /// The mapping holding `va`.
    pub fn lookup(&self, va: GpuVa) -> Option<&Mapping> {
        self.mappings
            .range(..=va.raw())
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.contains(va))
    }

    /// The mappings overlapping `[va, va + size)`, in VA order (the range
    /// is clipped at 2^64).
    pub fn mappings_in(&self, va: GpuVa, size: u64) -> impl Iterator<Item = &Mapping> {
        let start = va.raw();
        let end = start.saturating_add(size);
        let first = self.first_overlapping(start).unwrap_or(start);
        self.mappings
            .range(first..end.max(first))
            .map(|(_, m)| m)
            .filter(move |m| m.end().raw() > start && size > 0)
    }

    /// Every mapping, in VA order.
    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.values()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.mappings.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// Bytes mapped in the aperture (the daemon's reserved mappings are not
    /// counted).
    pub fn bound_bytes(&self) -> u64 {
        self.bound_bytes
    }

    /// Applies `update` to the attributes of `[va, va + size)` in the
    /// aperture. Everything is validated before anything changes.
    pub fn set_attrs(
        &mut self,
        va: GpuVa,
        size: u64,
        update: AttrUpdate,
    ) -> Result<(), GpuVmError> {
        let end = self.check_range(Area::Aperture, va, size)?;
        update.validate()?;
        if !update.is_empty() {
            self.attrs.apply(va.raw(), end, &update);
        }
        Ok(())
    }

    /// The attributes in effect at `va` (the defaults where none was set).
    pub fn attrs_at(&self, va: GpuVa) -> EffectiveAttrs {
        self.attrs.at(va)
    }

    /// The attribute ranges covering `[va, va + size)` (clipped at 2^64),
    /// defaults included, in VA order, clipped to the range; neighbours
    /// always differ.
    pub fn attr_ranges_in(
        &self,
        va: GpuVa,
        size: u64,
    ) -> impl Iterator<Item = (Range<GpuVa>, EffectiveAttrs)> {
        self.attrs
            .ranges_in(va.raw(), va.raw().saturating_add(size))
            .into_iter()
    }

    /// Number of stored attribute ranges (those that differ from the
    /// defaults), for a quota on guest-driven state.
    pub fn attr_range_count(&self) -> usize {
        self.attrs.stored_ranges()
    }

    fn prepare_map_in(
        &mut self,
        area: Area,
        req: MapRequest,
        res: &dyn ResourceSizes,
    ) -> Result<Plan<'_>, GpuVmError> {
        let end = self.check_range(area, req.va, req.size)?;
        if req.perms.is_empty() {
            return Err(GpuVmError::EmptyPerms);
        }
        check_backing(&req, res)?;
        let mut ops = self.take_ops();
        self.cut(req.va.raw(), end, &mut ops);
        // One mapping that already satisfies the request is the only one
        // the request overlaps: nothing to do (see the module docs).
        let satisfied = match ops.as_slice() {
            [Op::Remap { unmap, .. }] | [Op::Unmap(unmap)] => unmap.satisfies(&req),
            _ => false,
        };
        if satisfied {
            ops.clear();
        } else {
            ops.push(Op::Map(req.into_mapping()));
        }
        Ok(Plan { vm: self, ops })
    }

    /// Checks `[va, va + size)` for `area` and returns its end.
    fn check_range(&self, area: Area, va: GpuVa, size: u64) -> Result<u64, GpuVmError> {
        if size == 0 {
            return Err(GpuVmError::ZeroSize(va));
        }
        check_aligned("va", va.raw())?;
        check_aligned("size", size)?;
        let end = va.checked_add(size).ok_or(GpuVmError::Overflow {
            what: "va",
            start: va.raw(),
            size,
        })?;
        let (aperture, reserved) = (&self.layout.aperture, &self.layout.reserved);
        let inside = |r: &Range<GpuVa>| r.start <= va && end <= r.end;
        let touches = |r: &Range<GpuVa>| va < r.end && r.start < end;
        let reserved_err = GpuVmError::Reserved {
            va,
            size,
            start: reserved.start,
            end: reserved.end,
        };
        match area {
            Area::Aperture if touches(reserved) => Err(reserved_err),
            Area::Aperture if !inside(aperture) => Err(GpuVmError::OutsideAperture {
                va,
                size,
                start: aperture.start,
                end: aperture.end,
            }),
            Area::Reserved if !inside(reserved) => Err(reserved_err),
            _ => Ok(end.raw()),
        }
    }

    /// The start of the mapping that begins before `start` and reaches past
    /// it.
    fn first_overlapping(&self, start: u64) -> Option<u64> {
        self.mappings
            .range(..start)
            .next_back()
            .filter(|(_, m)| m.end().raw() > start)
            .map(|(&s, _)| s)
    }

    /// Appends the unmaps and remaps that empty `[start, end)`, in VA
    /// order. One descent of the tree: the overlapping mappings are the
    /// ones before `end`, walking down until one ends at or before `start`.
    fn cut(&self, start: u64, end: u64, ops: &mut Vec<Op>) {
        let first = ops.len();
        let overlapping = self
            .mappings
            .range(..end)
            .rev()
            .map(|(_, m)| m)
            .take_while(|m| m.end().raw() > start);
        for m in overlapping {
            let m_end = m.end().raw();
            let prev = (m.va.raw() < start)
                .then(|| m.sub_mapping(m.va, start - m.va.raw()))
                .flatten();
            let next = (m_end > end)
                .then(|| m.sub_mapping(GpuVa(end), m_end - end))
                .flatten();
            if prev.is_none() && next.is_none() {
                ops.push(Op::Unmap(m.clone()));
            } else {
                ops.push(Op::Remap {
                    unmap: m.clone(),
                    prev,
                    next,
                });
            }
        }
        if let Some(found) = ops.get_mut(first..) {
            found.reverse();
        }
    }

    /// An empty op list for a new plan, reusing the last plan's buffer.
    fn take_ops(&mut self) -> Vec<Op> {
        let mut ops = std::mem::take(&mut self.spare_ops);
        ops.clear();
        ops
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Map(m) => self.insert(m),
            Op::Remap { unmap, prev, next } => {
                // `prev` starts where `unmap` did: replace it in place.
                match prev {
                    Some(p) => self.replace(&unmap, p),
                    None => self.remove(&unmap),
                }
                if let Some(n) = next {
                    self.insert(n);
                }
            }
            Op::Unmap(m) => self.remove(&m),
        }
    }

    /// Replaces `old` by `new`, which starts at the same VA.
    fn replace(&mut self, old: &Mapping, new: Mapping) {
        let aperture = self.layout.in_aperture(new.va);
        match self.mappings.get_mut(&old.va.raw()) {
            Some(slot) if new.va == old.va => {
                if aperture {
                    self.bound_bytes = self
                        .bound_bytes
                        .saturating_sub(slot.size)
                        .saturating_add(new.size);
                }
                *slot = new;
            }
            _ => {
                self.remove(old);
                self.insert(new);
            }
        }
    }

    fn insert(&mut self, m: Mapping) {
        if self.layout.in_aperture(m.va) {
            self.bound_bytes = self.bound_bytes.saturating_add(m.size);
        }
        self.mappings.insert(m.va.raw(), m);
    }

    fn remove(&mut self, m: &Mapping) {
        if self.mappings.remove(&m.va.raw()).is_some() && self.layout.in_aperture(m.va) {
            self.bound_bytes = self.bound_bytes.saturating_sub(m.size);
        }
    }
}

fn check_aligned(what: &'static str, value: u64) -> Result<(), GpuVmError> {
    if value.is_multiple_of(PAGE_SIZE) {
        Ok(())
    } else {
        Err(GpuVmError::Misaligned { what, value })
    }
}

/// Checks that the backing of `req` holds exactly `req.size` bytes.
fn check_backing(req: &MapRequest, res: &dyn ResourceSizes) -> Result<(), GpuVmError> {
    let size = req.size;
    match &req.backing {
        MappingBacking::Resource { id, offset } => {
            check_aligned("offset", *offset)?;
            let resource_size = res
                .resource_size(*id)
                .ok_or(GpuVmError::UnknownResource(*id))?;
            let end = offset.checked_add(size).ok_or(GpuVmError::Overflow {
                what: "offset",
                start: *offset,
                size,
            })?;
            if end > resource_size {
                return Err(GpuVmError::BeyondBacking {
                    id: *id,
                    offset: *offset,
                    size,
                    resource_size,
                });
            }
            Ok(())
        }
        MappingBacking::Pages(list) => {
            let expected = size / PAGE_SIZE;
            let actual = list.len() as u64;
            if actual != expected {
                return Err(GpuVmError::PageCount { expected, actual });
            }
            match list.pages().iter().find(|p| !p.is_page_aligned()) {
                Some(p) => Err(GpuVmError::Misaligned {
                    what: "page",
                    value: p.raw(),
                }),
                None => Ok(()),
            }
        }
    }
}
