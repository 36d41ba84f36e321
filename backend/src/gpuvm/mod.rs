//! The GPU VM range manager: what is mapped where in one context's GPU
//! virtual address space.
//!
//! This is bookkeeping only, the same for every device, modelled on Linux's
//! `drm_gpuvm`. Mappings never overlap. A request to map a range over
//! existing mappings *replaces* what it covers; a request to unmap removes
//! it. Either is turned into a [`Plan`] of operations first:
//!
//! - [`Op::Unmap`] for every existing mapping the request covers entirely;
//! - [`Op::Remap`] for a mapping the request covers only partly: it is
//!   removed and its uncovered `prev` and/or `next` pieces stay, with their
//!   backing offsets adjusted. A request can only cut into the mappings at
//!   its two ends, so a plan has at most two remaps (or one remap with both
//!   pieces, when the request falls inside a single mapping);
//! - at most one [`Op::Map`], the new mapping.
//!
//! Preparing a plan validates the request and changes nothing; committing it
//! cannot fail. A driver applies the plan to its page tables between the
//! two, and drops the plan instead of committing if the device fails, so
//! the bookkeeping never describes a state the device is not in. The plan
//! borrows the VM mutably, so nothing else can change the VM in between.
//!
//! One deliberate difference from `drm_gpuvm`: a map request identical to an
//! existing mapping (same range, backing, offset and permissions) yields an
//! empty plan, where `drm_gpuvm` emits an unmap and a map with its `merge`
//! hint set. Re-binding the same memory is what a fault resolver racing
//! another one does, and it must not tear down translations in use.
//!
//! Range attributes ([`attrs`]) live beside the mappings, split and merge
//! over ranges the same way, and exist independently of them (an attribute
//! may be set before anything is bound, as with `madvise`).

pub mod attrs;
mod mapping;

use std::collections::BTreeMap;
use std::ops::Range;

use guest_proto::capset::{
    DEFAULT_APERTURE_END, DEFAULT_APERTURE_START, DEFAULT_RESERVED_END, DEFAULT_RESERVED_START,
};
use guest_proto::{GpuVa, PAGE_SIZE, ResourceId};

pub use attrs::{AttrUpdate, RangeAttrs};
pub use mapping::{Backing, MapRequest, Mapping, PageList};

/// The address space layout of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaLayout {
    /// Where the guest may bind.
    pub aperture: Range<GpuVa>,
    /// Where only the daemon maps (session memory).
    pub reserved: Range<GpuVa>,
}

impl VaLayout {
    /// The layout docs/protocol.md specifies: aperture `[64 KiB, 2^47)`,
    /// reserved `[2^47, 2^48)`.
    pub fn protocol_default() -> VaLayout {
        VaLayout {
            aperture: DEFAULT_APERTURE_START..DEFAULT_APERTURE_END,
            reserved: DEFAULT_RESERVED_START..DEFAULT_RESERVED_END,
        }
    }
}

/// Sizes of the resources a VM may map.
pub trait ResourceSizes {
    /// Size in bytes of resource `id`, `None` if it does not exist (for
    /// this context).
    fn resource_size(&self, id: ResourceId) -> Option<u64>;
}

/// Why a request was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuVmError {
    /// A range of zero bytes.
    #[error("range at {0} has zero size")]
    ZeroSize(GpuVa),
    /// `va + size` wraps around 2^64.
    #[error("range {va}+{size:#x} wraps around the address space")]
    Overflow {
        /// Start.
        va: GpuVa,
        /// Length.
        size: u64,
    },
    /// The range is not inside the aperture (or the reserved range, for a
    /// daemon mapping).
    #[error("range {va}+{size:#x} is outside the allowed VA range")]
    OutsideAperture {
        /// Start.
        va: GpuVa,
        /// Length.
        size: u64,
    },
    /// The range touches the reserved range.
    #[error("range {va}+{size:#x} touches the reserved range")]
    Reserved {
        /// Start.
        va: GpuVa,
        /// Length.
        size: u64,
    },
    /// Not page-aligned.
    #[error("{what} {value:#x} is not page aligned")]
    Misaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The resource does not exist for this context.
    #[error("unknown resource {0:?}")]
    UnknownResource(ResourceId),
    /// The mapping would extend past the end of the resource.
    #[error("{offset:#x}+{size:#x} is past the end of {id:?} ({resource_size:#x} bytes)")]
    BeyondBacking {
        /// The resource.
        id: ResourceId,
        /// Offset in it.
        offset: u64,
        /// Length.
        size: u64,
        /// Its size.
        resource_size: u64,
    },
    /// A page list whose length does not match the range.
    #[error("{actual} pages given for a range of {expected} pages")]
    PageCount {
        /// Pages the range needs.
        expected: u64,
        /// Pages given.
        actual: u64,
    },
    /// A map without any permission.
    #[error("a mapping needs at least one permission")]
    EmptyPerms,
    /// A fault granule outside 2^12 ..= 2^30.
    #[error("granule shift {0} is outside 12..=30")]
    BadGranule(u8),
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A new mapping.
    Map(Mapping),
    /// An existing mapping shrinks: `unmap` goes, its `prev` and `next`
    /// pieces (outside the request) stay.
    Remap {
        /// The mapping as it is now.
        unmap: Mapping,
        /// The piece before the request, if any.
        prev: Option<Mapping>,
        /// The piece after the request, if any.
        next: Option<Mapping>,
    },
    /// An existing mapping goes entirely.
    Unmap(Mapping),
}

/// The operations that carry out one request, not yet applied. Dropping it
/// aborts the request.
#[derive(Debug)]
#[must_use = "a plan changes nothing until it is committed"]
pub struct Plan<'vm> {
    vm: &'vm mut GpuVm,
    ops: Vec<Op>,
}

impl Plan<'_> {
    /// The operations, unmaps and remaps in ascending VA order, then the
    /// map.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Whether the request changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies the plan to the bookkeeping.
    pub fn commit(self) {
        let Plan { vm, ops } = self;
        for op in ops {
            match op {
                Op::Unmap(m) => vm.remove(&m),
                Op::Remap { unmap, prev, next } => {
                    vm.remove(&unmap);
                    for piece in [prev, next].into_iter().flatten() {
                        vm.insert(piece);
                    }
                }
                Op::Map(m) => vm.insert(m),
            }
        }
    }
}

/// The mappings and range attributes of one GPU VM.
#[derive(Debug)]
pub struct GpuVm {
    layout: VaLayout,
    mappings: BTreeMap<GpuVa, Mapping>,
    bound_bytes: u64,
    attrs: attrs::AttrMap,
}

impl GpuVm {
    /// An empty VM.
    pub fn new(layout: VaLayout) -> GpuVm {
        GpuVm {
            layout,
            mappings: BTreeMap::new(),
            bound_bytes: 0,
            attrs: attrs::AttrMap::default(),
        }
    }

    /// The layout.
    pub fn layout(&self) -> &VaLayout {
        &self.layout
    }

    /// Plans a guest map, inside the aperture.
    pub fn prepare_map(
        &mut self,
        req: MapRequest,
        res: &dyn ResourceSizes,
    ) -> Result<Plan<'_>, GpuVmError> {
        check_range(&self.layout, req.va, req.size, Space::Aperture)?;
        self.plan_map(req, res)
    }

    /// Plans a daemon map, inside the reserved range.
    pub fn prepare_map_reserved(
        &mut self,
        req: MapRequest,
        res: &dyn ResourceSizes,
    ) -> Result<Plan<'_>, GpuVmError> {
        check_range(&self.layout, req.va, req.size, Space::Reserved)?;
        self.plan_map(req, res)
    }

    fn plan_map(
        &mut self,
        req: MapRequest,
        res: &dyn ResourceSizes,
    ) -> Result<Plan<'_>, GpuVmError> {
        if req.perms.is_empty() {
            return Err(GpuVmError::EmptyPerms);
        }
        check_backing(&req, res)?;
        let new = Mapping {
            va: req.va,
            size: req.size,
            backing: req.backing,
            perms: req.perms,
        };
        if self.mappings.get(&new.va) == Some(&new) {
            return Ok(Plan {
                vm: self,
                ops: Vec::new(),
            });
        }
        let mut ops = self.cut(new.va, new.size);
        ops.push(Op::Map(new));
        Ok(Plan { vm: self, ops })
    }

    /// Plans a guest unmap of `[va, va + size)`, inside the aperture. An
    /// empty range gives an empty plan.
    pub fn prepare_unmap(&mut self, va: GpuVa, size: u64) -> Result<Plan<'_>, GpuVmError> {
        check_range(&self.layout, va, size, Space::Aperture)?;
        let ops = self.cut(va, size);
        Ok(Plan { vm: self, ops })
    }

    /// Plans the removal of every mapping backed by resource `id`.
    pub fn prepare_unmap_resource(&mut self, id: ResourceId) -> Plan<'_> {
        let ops = self
            .mappings
            .values()
            .filter(|m| m.resource() == Some(id))
            .cloned()
            .map(Op::Unmap)
            .collect();
        Plan { vm: self, ops }
    }

    /// Removes everything (teardown); returns what was mapped.
    pub fn clear(&mut self) -> Vec<Mapping> {
        self.bound_bytes = 0;
        self.attrs = attrs::AttrMap::default();
        std::mem::take(&mut self.mappings).into_values().collect()
    }

    /// The mapping that contains `va`.
    pub fn lookup(&self, va: GpuVa) -> Option<&Mapping> {
        self.mappings
            .range(..=va)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.contains(va))
    }

    /// The mappings that overlap `[va, va + size)`, in VA order.
    pub fn mappings_in(&self, va: GpuVa, size: u64) -> impl Iterator<Item = &Mapping> {
        let end = GpuVa(va.raw().saturating_add(size));
        let first = self.lookup(va).map_or(va, |m| m.va);
        self.mappings
            .range(first..end)
            .map(|(_, m)| m)
            .filter(move |m| size > 0 && m.end() > va)
    }

    /// All mappings, in VA order.
    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.values()
    }

    /// Bytes mapped in the aperture.
    pub fn bound_bytes(&self) -> u64 {
        self.bound_bytes
    }

    /// Sets attributes on `[va, va + size)` (aperture only). Validates
    /// everything before changing anything.
    pub fn set_attrs(
        &mut self,
        va: GpuVa,
        size: u64,
        update: AttrUpdate,
    ) -> Result<(), GpuVmError> {
        check_range(&self.layout, va, size, Space::Aperture)?;
        update.validate()?;
        self.attrs.set(va.raw(), va.raw() + size, &update);
        Ok(())
    }

    /// The attributes in force at `va`.
    pub fn attrs_at(&self, va: GpuVa) -> RangeAttrs {
        self.attrs.at(va.raw())
    }

    /// The attribute ranges covering `[va, va + size)`, defaults included,
    /// in VA order.
    pub fn attr_ranges_in(&self, va: GpuVa, size: u64) -> Vec<(Range<GpuVa>, RangeAttrs)> {
        self.attrs
            .ranges_in(va.raw(), va.raw().saturating_add(size))
            .into_iter()
            .map(|(r, a)| (GpuVa(r.start)..GpuVa(r.end), a))
            .collect()
    }

    /// The ops that clear `[va, va + size)`: unmaps of covered mappings and
    /// remaps of the (at most two) mappings cut at the ends.
    fn cut(&self, va: GpuVa, size: u64) -> Vec<Op> {
        let end = GpuVa(va.raw() + size);
        self.mappings_in(va, size)
            .map(|m| {
                if va <= m.va && m.end() <= end {
                    return Op::Unmap(m.clone());
                }
                let prev = (m.va < va).then(|| m.piece(m.va, va.raw() - m.va.raw()));
                let next = (m.end() > end).then(|| m.piece(end, m.end().raw() - end.raw()));
                Op::Remap {
                    unmap: m.clone(),
                    prev,
                    next,
                }
            })
            .collect()
    }

    fn in_aperture(&self, m: &Mapping) -> bool {
        m.va >= self.layout.aperture.start && m.end() <= self.layout.aperture.end
    }

    fn remove(&mut self, m: &Mapping) {
        if self.mappings.remove(&m.va).is_some() && self.in_aperture(m) {
            self.bound_bytes -= m.size;
        }
    }

    fn insert(&mut self, m: Mapping) {
        if self.in_aperture(&m) {
            self.bound_bytes += m.size;
        }
        self.mappings.insert(m.va, m);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Space {
    Aperture,
    Reserved,
}

fn check_range(layout: &VaLayout, va: GpuVa, size: u64, space: Space) -> Result<(), GpuVmError> {
    if size == 0 {
        return Err(GpuVmError::ZeroSize(va));
    }
    if !va.is_page_aligned() {
        return Err(GpuVmError::Misaligned {
            what: "va",
            value: va.raw(),
        });
    }
    if size % PAGE_SIZE != 0 {
        return Err(GpuVmError::Misaligned {
            what: "size",
            value: size,
        });
    }
    let end = va
        .checked_add(size)
        .ok_or(GpuVmError::Overflow { va, size })?;
    let allowed = match space {
        Space::Aperture => &layout.aperture,
        Space::Reserved => &layout.reserved,
    };
    if va >= allowed.start && end <= allowed.end {
        return Ok(());
    }
    let touches_reserved = va < layout.reserved.end && end > layout.reserved.start;
    if space == Space::Aperture && touches_reserved {
        Err(GpuVmError::Reserved { va, size })
    } else {
        Err(GpuVmError::OutsideAperture { va, size })
    }
}

fn check_backing(req: &MapRequest, res: &dyn ResourceSizes) -> Result<(), GpuVmError> {
    match &req.backing {
        Backing::Resource { id, offset } => {
            if offset % PAGE_SIZE != 0 {
                return Err(GpuVmError::Misaligned {
                    what: "offset",
                    value: *offset,
                });
            }
            let resource_size = res
                .resource_size(*id)
                .ok_or(GpuVmError::UnknownResource(*id))?;
            let beyond = GpuVmError::BeyondBacking {
                id: *id,
                offset: *offset,
                size: req.size,
                resource_size,
            };
            match offset.checked_add(req.size) {
                Some(end) if end <= resource_size => Ok(()),
                _ => Err(beyond),
            }
        }
        Backing::Pages(list) => {
            let expected = req.size / PAGE_SIZE;
            let actual = list.pages().len() as u64;
            if expected != actual {
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
