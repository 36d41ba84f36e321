//! The GPU VM against a per-page oracle: random maps and unmaps over a small
//! window, and after every step each page's backing and permissions, the
//! mapping invariants and `bound_bytes` must match the oracle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gpu_backend::gpuvm::{
    GpuVm, MapRequest, Mapping, MappingBacking, Op, PageArray, PageBacking, ResourceSizes, VaLayout,
};
use guest_proto::{GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, ResourceId};
use proptest::prelude::*;

const BASE: u64 = 0x4000_0000;
const WINDOW_PAGES: u64 = 48;
const MAX_LEN: u64 = 12;
const RESOURCE_PAGES: u64 = 64;

struct Sizes;

impl ResourceSizes for Sizes {
    fn resource_size(&self, id: ResourceId) -> Option<u64> {
        (1..=3)
            .contains(&id.0)
            .then_some(RESOURCE_PAGES * PAGE_SIZE)
    }
}

#[derive(Clone, Debug)]
enum Source {
    /// Resource `id` from page `first` on.
    Resource { id: u32, first: u64 },
    /// Guest pages `base, base + stride, ...` (pages numbers).
    Pages { base: u64, stride: u64 },
}

#[derive(Clone, Debug)]
enum Step {
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

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![
        (1u32..=3, 0..RESOURCE_PAGES - MAX_LEN)
            .prop_map(|(id, first)| Source::Resource { id, first }),
        (0u64..1 << 20, 1u64..=3).prop_map(|(base, stride)| Source::Pages { base, stride }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let place = (0..WINDOW_PAGES, 1..=MAX_LEN).prop_map(|(page, len)| {
        let len = len.min(WINDOW_PAGES - page);
        (page, len)
    });
    prop_oneof![
        3 => (place.clone(), source(), 1u32..=7, proptest::bool::weighted(0.9)).prop_map(
            |((page, len), source, perms, commit)| Step::Map { page, len, source, perms, commit }
        ),
        2 => (place, proptest::bool::weighted(0.9))
            .prop_map(|((page, len), commit)| Step::Unmap { page, len, commit }),
        1 => (1u32..=3).prop_map(|id| Step::UnmapResource { id }),
        1 => (0..WINDOW_PAGES, 0..MAX_LEN, 1..=MAX_LEN)
            .prop_map(|(page, skip, len)| Step::Rebind { page, skip, len }),
    ]
}

type Oracle = Vec<Option<(PageBacking, Perms)>>;

fn page_va(page: u64) -> GpuVa {
    GpuVa(BASE + page * PAGE_SIZE)
}

fn request(page: u64, len: u64, source: &Source, perms: Perms) -> MapRequest {
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

fn oracle_map(oracle: &mut Oracle, page: u64, len: u64, source: &Source, perms: Perms) {
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

fn check_plan(ops: &[Op]) {
    let remaps = ops.iter().filter(|o| matches!(o, Op::Remap { .. })).count();
    let maps = ops.iter().filter(|o| matches!(o, Op::Map(_))).count();
    assert!(remaps <= 2 && maps <= 1, "{ops:?}");
    if maps == 1 {
        assert!(matches!(ops.last(), Some(Op::Map(_))), "{ops:?}");
    }
}

fn check(vm: &GpuVm, oracle: &Oracle) {
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gpuvm_matches_a_per_page_oracle(steps in proptest::collection::vec(step(), 1..60)) {
        let mut vm = GpuVm::new(VaLayout::protocol_default());
        let mut oracle: Oracle = vec![None; WINDOW_PAGES as usize];
        for step in &steps {
            let before: Vec<Mapping> = vm.iter().cloned().collect();
            match step {
                Step::Map { page, len, source, perms, commit } => {
                    let perms = Perms::from_bits(*perms).unwrap();
                    let plan = vm.prepare_map(request(*page, *len, source, perms), &Sizes).unwrap();
                    check_plan(plan.ops());
                    let after = plan.bound_bytes_after();
                    if *commit {
                        plan.commit();
                        oracle_map(&mut oracle, *page, *len, source, perms);
                        prop_assert_eq!(vm.bound_bytes(), after);
                    } else {
                        drop(plan);
                        prop_assert_eq!(vm.iter().cloned().collect::<Vec<_>>(), before);
                    }
                }
                Step::Unmap { page, len, commit } => {
                    let plan = vm.prepare_unmap(page_va(*page), len * PAGE_SIZE).unwrap();
                    check_plan(plan.ops());
                    prop_assert!(!plan.ops().iter().any(|o| matches!(o, Op::Map(_))));
                    if *commit {
                        plan.commit();
                        for p in *page..page + len {
                            oracle[p as usize] = None;
                        }
                    } else {
                        drop(plan);
                        prop_assert_eq!(vm.iter().cloned().collect::<Vec<_>>(), before);
                    }
                }
                Step::UnmapResource { id } => {
                    let plan = vm.prepare_unmap_resource(ResourceId(*id));
                    prop_assert!(plan.ops().iter().all(|o| matches!(o, Op::Unmap(m) if m.resource() == Some(ResourceId(*id)))));
                    plan.commit();
                    for slot in oracle.iter_mut() {
                        if matches!(slot, Some((PageBacking::Resource { id: r, .. }, _)) if r.0 == *id) {
                            *slot = None;
                        }
                    }
                }
                Step::Rebind { page, skip, len } => {
                    let Some(m) = vm.lookup(page_va(*page)).cloned() else {
                        continue;
                    };
                    let pages = m.size / PAGE_SIZE;
                    let skip = skip % pages;
                    let len = (*len).min(pages - skip);
                    let part = m.sub_mapping(GpuVa(m.va.raw() + skip * PAGE_SIZE), len * PAGE_SIZE).unwrap();
                    let req = MapRequest { va: part.va, size: part.size, backing: part.backing, perms: part.perms };
                    prop_assert!(vm.prepare_map(req.clone(), &Sizes).unwrap().is_empty());
                    // Another permission is a real change.
                    let other = MapRequest { perms: Perms::from_bits(req.perms.bits() % 7 + 1).unwrap(), ..req };
                    prop_assert!(!vm.prepare_map(other, &Sizes).unwrap().is_empty());
                }
            }
            check(&vm, &oracle);
        }
        let cleared = vm.clear();
        prop_assert_eq!(cleared.iter().map(|m| m.size).sum::<u64>(),
            oracle.iter().filter(|p| p.is_some()).count() as u64 * PAGE_SIZE);
        prop_assert_eq!(vm.bound_bytes(), 0);
    }
}
