//! The per-page model a GpuVm is checked against: steps (map, unmap,
//! unmap a resource, rebind part of a mapping exactly as it is), the
//! expected backing and permissions of every page of a small window, and
//! the checks after each step. Shared by the property test
//! (`gpuvm_oracle.rs`) and the fuzz target `gpuvm_ops`.

use gpu_backend::gpuvm::{
    GpuVm, MapRequest, Mapping, MappingBacking, Op, PageArray, PageBacking, ResourceSizes,
};
use guest_proto::{GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, ResourceId};

pub const BASE: u64 = 0x4000_0000;
pub const WINDOW_PAGES: u64 = 48;
pub const MAX_LEN: u64 = 12;
pub const RESOURCE_PAGES: u64 = 64;

/// Resources 1 to 3, each `RESOURCE_PAGES` long.
pub struct Sizes;

impl ResourceSizes for Sizes {
    fn resource_size(&self, id: ResourceId) -> Option<u64> {
        (1..=3)
            .contains(&id.0)
            .then_some(RESOURCE_PAGES * PAGE_SIZE)
    }
}

#[derive(Clone, Debug)]
pub enum Source {
    /// Resource `id` from page `first` on.
    Resource { id: u32, first: u64 },
    /// Guest pages `base, base + stride, ...` (pages numbers).
    Pages { base: u64, stride: u64 },
}

#[derive(Clone, Debug)]
pub enum Step {
    Map {
        page: u64,
        len: u64,
        source: Source,
        perms: u32,
        commit: bool,
    },
    Unmap {
        page: u64,
        len: u64,
        commit: bool,
    },
    UnmapResource {
        id: u32,
    },
    /// Asks again for part of whatever is mapped at `page`, exactly as it
    /// is mapped: the plan must be empty.
    Rebind {
        page: u64,
        skip: u64,
        len: u64,
    },
}

pub type Oracle = Vec<Option<(PageBacking, Perms)>>;

/// An empty model of the window.
pub fn empty() -> Oracle {
    vec![None; WINDOW_PAGES as usize]
}

pub fn page_va(page: u64) -> GpuVa {
    GpuVa(BASE + page * PAGE_SIZE)
}

pub fn request(page: u64, len: u64, source: &Source, perms: Perms) -> MapRequest {
    let backing = match *source {
        Source::Resource { id, first } => MappingBacking::Resource {
            id: ResourceId(id),
            offset: first * PAGE_SIZE,
        },
        Source::Pages { base, stride } => MappingBacking::Pages(PageArray::new(
            (0..len)
                .map(|i| GuestPhysAddr((base + i * stride) * PAGE_SIZE))
                .collect(),
        )),
    };
    MapRequest {
        va: page_va(page),
        size: len * PAGE_SIZE,
        backing,
        perms,
    }
}

pub fn oracle_map(oracle: &mut Oracle, page: u64, len: u64, source: &Source, perms: Perms) {
    for i in 0..len {
        let backing = match *source {
            Source::Resource { id, first } => PageBacking::Resource {
                id: ResourceId(id),
                offset: (first + i) * PAGE_SIZE,
            },
            Source::Pages { base, stride } => {
                PageBacking::Guest(GuestPhysAddr((base + i * stride) * PAGE_SIZE))
            }
        };
        oracle[(page + i) as usize] = Some((backing, perms));
    }
}

pub fn check_plan(ops: &[Op]) {
    let remaps = ops.iter().filter(|o| matches!(o, Op::Remap { .. })).count();
    let maps = ops.iter().filter(|o| matches!(o, Op::Map(_))).count();
    assert!(remaps <= 2 && maps <= 1, "{ops:?}");
    if maps == 1 {
        assert!(matches!(ops.last(), Some(Op::Map(_))), "{ops:?}");
    }
}

pub fn check(vm: &GpuVm, oracle: &Oracle) {
    for (page, expected) in oracle.iter().enumerate() {
        let va = GpuVa(page_va(page as u64).raw() + 0x42);
        let got = vm
            .lookup(va)
            .map(|m| (m.page_backing(va).unwrap(), m.perms));
        assert_eq!(&got, expected, "page {page}");
    }
    let all: Vec<&Mapping> = vm.iter().collect();
    for m in &all {
        assert!(m.size > 0 && m.size % PAGE_SIZE == 0 && m.va.is_page_aligned());
        if let MappingBacking::Pages(list) = &m.backing {
            assert_eq!(list.len() as u64 * PAGE_SIZE, m.size);
        }
    }
    assert!(all.windows(2).all(|w| w[0].end() <= w[1].va), "overlap");
    let bound = oracle.iter().filter(|p| p.is_some()).count() as u64 * PAGE_SIZE;
    assert_eq!(vm.bound_bytes(), bound);
    let sum: u64 = all.iter().map(|m| m.size).sum();
    assert_eq!(sum, bound);
}

/// Applies `step` to `vm` and to the model, asserting what the step itself
/// promises (plan shape, nothing changed by a dropped plan); then
/// [`check`] compares the whole window.
pub fn apply(vm: &mut GpuVm, oracle: &mut Oracle, step: &Step) {
    let before: Vec<Mapping> = vm.iter().cloned().collect();
    match step {
        Step::Map {
            page,
            len,
            source,
            perms,
            commit,
        } => {
            let perms = Perms::from_bits(*perms).unwrap();
            let plan = vm
                .prepare_map(request(*page, *len, source, perms), &Sizes)
                .unwrap();
            check_plan(plan.ops());
            let after = plan.bound_bytes_after();
            if *commit {
                plan.commit();
                oracle_map(oracle, *page, *len, source, perms);
                assert_eq!(vm.bound_bytes(), after);
            } else {
                drop(plan);
                assert_eq!(vm.iter().cloned().collect::<Vec<_>>(), before);
            }
        }
        Step::Unmap { page, len, commit } => {
            let plan = vm.prepare_unmap(page_va(*page), len * PAGE_SIZE).unwrap();
            check_plan(plan.ops());
            assert!(!plan.ops().iter().any(|o| matches!(o, Op::Map(_))));
            if *commit {
                plan.commit();
                for p in *page..page + len {
                    oracle[p as usize] = None;
                }
            } else {
                drop(plan);
                assert_eq!(vm.iter().cloned().collect::<Vec<_>>(), before);
            }
        }
        Step::UnmapResource { id } => {
            let plan = vm.prepare_unmap_resource(ResourceId(*id));
            assert!(
                plan.ops()
                    .iter()
                    .all(|o| matches!(o, Op::Unmap(m) if m.resource() == Some(ResourceId(*id))))
            );
            plan.commit();
            for slot in oracle.iter_mut() {
                if matches!(slot, Some((PageBacking::Resource { id: r, .. }, _)) if r.0 == *id) {
                    *slot = None;
                }
            }
        }
        Step::Rebind { page, skip, len } => {
            let Some(m) = vm.lookup(page_va(*page)).cloned() else {
                return;
            };
            let pages = m.size / PAGE_SIZE;
            let skip = skip % pages;
            let len = (*len).min(pages - skip);
            let part = m
                .sub_mapping(GpuVa(m.va.raw() + skip * PAGE_SIZE), len * PAGE_SIZE)
                .unwrap();
            let req = MapRequest {
                va: part.va,
                size: part.size,
                backing: part.backing,
                perms: part.perms,
            };
            assert!(vm.prepare_map(req.clone(), &Sizes).unwrap().is_empty());
            // Another permission is a real change.
            let other = MapRequest {
                perms: Perms::from_bits(req.perms.bits() % 7 + 1).unwrap(),
                ..req
            };
            assert!(!vm.prepare_map(other, &Sizes).unwrap().is_empty());
        }
    }
    check(vm, oracle);
}
