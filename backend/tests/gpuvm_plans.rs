//! Plans of the GPU VM range manager: every case of drm_gpuvm's "Split and
//! merge" table, unmap splitting, rejections, and the prepare/commit split.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use gpu_backend::gpuvm::{
    GpuVm, GpuVmError, MapRequest, Mapping, MappingBacking, Op, PageArray, PageBacking,
    ResourceSizes, VaLayout,
};
use guest_proto::{GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, ResourceId};

/// Base of the test window, inside the aperture.
const BASE: u64 = 0x10_0000;
/// One unit of drm_gpuvm's diagrams: four pages.
const U: u64 = 4 * PAGE_SIZE;
const A: ResourceId = ResourceId(1);
const B: ResourceId = ResourceId(2);
/// The diagrams' BO offsets n and m.
const N: u64 = 0x10_0000;
const M: u64 = 0x40_0000;

struct Sizes(HashMap<ResourceId, u64>);

impl ResourceSizes for Sizes {
    fn resource_size(&self, id: ResourceId) -> Option<u64> {
        self.0.get(&id).copied()
    }
}

fn sizes() -> Sizes {
    Sizes(HashMap::from([(A, 0x100_0000), (B, 0x100_0000)]))
}

fn va(unit: u64) -> GpuVa {
    GpuVa(BASE + unit * U)
}

/// A mapping of resource `id` over units `[from, to)` at byte `offset`.
fn res(from: u64, to: u64, id: ResourceId, offset: u64) -> Mapping {
    Mapping {
        va: va(from),
        size: (to - from) * U,
        backing: MappingBacking::Resource { id, offset },
        perms: Perms::RW,
    }
}

fn req(m: &Mapping) -> MapRequest {
    MapRequest {
        va: m.va,
        size: m.size,
        backing: m.backing.clone(),
        perms: m.perms,
    }
}

fn vm_with(mappings: &[Mapping]) -> GpuVm {
    let mut vm = GpuVm::new(VaLayout::protocol_default());
    for m in mappings {
        vm.prepare_map(req(m), &sizes()).unwrap().commit();
    }
    assert_eq!(vm.iter().cloned().collect::<Vec<_>>(), mappings);
    vm
}

fn snapshot(vm: &GpuVm) -> (Vec<Mapping>, u64) {
    (vm.iter().cloned().collect(), vm.bound_bytes())
}

/// Checks the shape every plan must have: ascending VA, unmaps and remaps
/// before at most one map, at most two remaps.
fn check_shape(ops: &[Op]) {
    let remaps = ops
        .iter()
        .filter(|op| matches!(op, Op::Remap { .. }))
        .count();
    let maps = ops.iter().filter(|op| matches!(op, Op::Map(_))).count();
    assert!(remaps <= 2, "{ops:?}");
    assert!(maps <= 1, "{ops:?}");
    if maps == 1 {
        assert!(matches!(ops.last(), Some(Op::Map(_))), "{ops:?}");
    }
    let starts: Vec<GpuVa> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Unmap(m) | Op::Remap { unmap: m, .. } => Some(m.va),
            Op::Map(_) => None,
        })
        .collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "{ops:?}");
    for op in ops {
        if let Op::Remap { prev, next, .. } = op {
            assert!(prev.is_some() || next.is_some(), "{ops:?}");
        }
    }
}

struct Case {
    name: &'static str,
    old: Vec<Mapping>,
    req: Mapping,
    ops: Vec<Op>,
    after: Vec<Mapping>,
}

fn remap(unmap: &Mapping, prev: Option<Mapping>, next: Option<Mapping>) -> Op {
    Op::Remap {
        unmap: unmap.clone(),
        prev,
        next,
    }
}

/// The cases of drm_gpuvm's split and merge table, in its numbering. Where
/// drm_gpuvm splits a mapping that already satisfies the request (1, 6, 8,
/// 12) the plan is empty and the old mapping stays whole (see the module
/// docs of `gpuvm`).
fn drm_gpuvm_cases() -> Vec<Case> {
    let a01 = res(0, 1, A, N);
    let a02 = res(0, 2, A, N);
    let a03 = res(0, 3, A, N);
    let a12 = res(1, 2, A, N + U);
    let a13 = res(1, 3, A, N);
    vec![
        Case {
            name: "1: identical request",
            old: vec![a01.clone()],
            req: a01.clone(),
            ops: vec![],
            after: vec![a01.clone()],
        },
        Case {
            name: "2: identical but for the offset",
            old: vec![a01.clone()],
            req: res(0, 1, A, M),
            ops: vec![Op::Unmap(a01.clone()), Op::Map(res(0, 1, A, M))],
            after: vec![res(0, 1, A, M)],
        },
        Case {
            name: "3: identical but for the BO",
            old: vec![a01.clone()],
            req: res(0, 1, B, N),
            ops: vec![Op::Unmap(a01.clone()), Op::Map(res(0, 1, B, N))],
            after: vec![res(0, 1, B, N)],
        },
        Case {
            name: "4: old is a left-aligned subset of the request",
            old: vec![a01.clone()],
            req: a02.clone(),
            ops: vec![Op::Unmap(a01.clone()), Op::Map(a02.clone())],
            after: vec![a02.clone()],
        },
        Case {
            name: "4 (note): same with another BO",
            old: vec![a01.clone()],
            req: res(0, 2, B, M),
            ops: vec![Op::Unmap(a01.clone()), Op::Map(res(0, 2, B, M))],
            after: vec![res(0, 2, B, M)],
        },
        Case {
            name: "5: request is a left-aligned subset, other BO",
            old: vec![a02.clone()],
            req: res(0, 1, B, N),
            ops: vec![
                remap(&a02, None, Some(res(1, 2, A, N + U))),
                Op::Map(res(0, 1, B, N)),
            ],
            after: vec![res(0, 1, B, N), res(1, 2, A, N + U)],
        },
        Case {
            name: "6: request is a left-aligned subset, same BO and offset",
            old: vec![a02.clone()],
            req: a01.clone(),
            ops: vec![],
            after: vec![a02.clone()],
        },
        Case {
            name: "7: request is a right-aligned subset, other BO",
            old: vec![a02.clone()],
            req: res(1, 2, B, M),
            ops: vec![
                remap(&a02, Some(a01.clone()), None),
                Op::Map(res(1, 2, B, M)),
            ],
            after: vec![a01.clone(), res(1, 2, B, M)],
        },
        Case {
            name: "8: request is a right-aligned subset, same BO, contiguous offset",
            old: vec![a02.clone()],
            req: a12.clone(),
            ops: vec![],
            after: vec![a02.clone()],
        },
        Case {
            name: "9: old overlapped at its end, other BO",
            old: vec![a02.clone()],
            req: res(1, 3, B, M),
            ops: vec![
                remap(&a02, Some(a01.clone()), None),
                Op::Map(res(1, 3, B, M)),
            ],
            after: vec![a01.clone(), res(1, 3, B, M)],
        },
        Case {
            name: "10: old overlapped at its end, same BO, contiguous offset",
            old: vec![a02.clone()],
            req: res(1, 3, A, N + U),
            ops: vec![
                remap(&a02, Some(a01.clone()), None),
                Op::Map(res(1, 3, A, N + U)),
            ],
            after: vec![a01.clone(), res(1, 3, A, N + U)],
        },
        Case {
            name: "11: request centred in old, other BO",
            old: vec![a03.clone()],
            req: res(1, 2, B, M),
            ops: vec![
                remap(&a03, Some(a01.clone()), Some(res(2, 3, A, N + 2 * U))),
                Op::Map(res(1, 2, B, M)),
            ],
            after: vec![a01.clone(), res(1, 2, B, M), res(2, 3, A, N + 2 * U)],
        },
        Case {
            name: "12: request centred in old, same BO, contiguous offset",
            old: vec![a03.clone()],
            req: a12.clone(),
            ops: vec![],
            after: vec![a03.clone()],
        },
        Case {
            name: "13: old is a right-aligned subset of the request",
            old: vec![a12.clone()],
            req: a02.clone(),
            ops: vec![Op::Unmap(a12.clone()), Op::Map(a02.clone())],
            after: vec![a02.clone()],
        },
        Case {
            name: "13 (note): same with another BO",
            old: vec![a12.clone()],
            req: res(0, 2, B, M),
            ops: vec![Op::Unmap(a12.clone()), Op::Map(res(0, 2, B, M))],
            after: vec![res(0, 2, B, M)],
        },
        Case {
            name: "14: old centred in the request",
            old: vec![a12.clone()],
            req: a03.clone(),
            ops: vec![Op::Unmap(a12.clone()), Op::Map(a03.clone())],
            after: vec![a03.clone()],
        },
        Case {
            name: "15: old overlapped at its start, other BO",
            old: vec![a13.clone()],
            req: res(0, 2, B, M),
            ops: vec![
                remap(&a13, None, Some(res(2, 3, A, N + U))),
                Op::Map(res(0, 2, B, M)),
            ],
            after: vec![res(0, 2, B, M), res(2, 3, A, N + U)],
        },
    ]
}

#[test]
fn drm_gpuvm_split_and_merge_table() {
    for case in drm_gpuvm_cases() {
        let mut vm = vm_with(&case.old);
        let plan = vm.prepare_map(req(&case.req), &sizes()).unwrap();
        assert_eq!(plan.ops(), case.ops.as_slice(), "{}", case.name);
        assert_eq!(plan.is_empty(), case.ops.is_empty(), "{}", case.name);
        check_shape(plan.ops());
        let expected_bytes: u64 = case.after.iter().map(|m| m.size).sum();
        assert_eq!(plan.bound_bytes_after(), expected_bytes, "{}", case.name);
        plan.commit();
        assert_eq!(snapshot(&vm), (case.after, expected_bytes), "{}", case.name);
    }
}

#[test]
fn other_permissions_replace_an_otherwise_identical_mapping() {
    let old = res(0, 2, A, N);
    let mut vm = vm_with(std::slice::from_ref(&old));
    let mut new = res(0, 1, A, N);
    new.perms = Perms::READ;
    let plan = vm.prepare_map(req(&new), &sizes()).unwrap();
    assert_eq!(
        plan.ops(),
        &[
            remap(&old, None, Some(res(1, 2, A, N + U))),
            Op::Map(new.clone())
        ]
    );
    plan.commit();
    assert_eq!(snapshot(&vm).0, vec![new, res(1, 2, A, N + U)]);
}

fn pages(first: u64, count: u64) -> Vec<GuestPhysAddr> {
    (0..count)
        .map(|i| GuestPhysAddr((first + 7 * i) * PAGE_SIZE))
        .collect()
}

fn page_mapping(from_page: u64, gpas: Vec<GuestPhysAddr>) -> Mapping {
    Mapping {
        va: GpuVa(BASE + from_page * PAGE_SIZE),
        size: gpas.len() as u64 * PAGE_SIZE,
        backing: MappingBacking::Pages(PageArray::new(gpas)),
        perms: Perms::ALL,
    }
}

#[test]
fn a_page_list_is_split_into_windows() {
    let all = pages(100, 6);
    let old = page_mapping(0, all.clone());
    let mut vm = vm_with(std::slice::from_ref(&old));
    let new = res(0, 1, B, M);
    // Request pages 2..4 of the six, with a resource.
    let mut middle = new.clone();
    middle.va = GpuVa(BASE + 2 * PAGE_SIZE);
    middle.size = 2 * PAGE_SIZE;
    let plan = vm.prepare_map(req(&middle), &sizes()).unwrap();
    let prev = page_mapping(0, all[..2].to_vec());
    let next = page_mapping(4, all[4..].to_vec());
    assert_eq!(
        plan.ops(),
        &[
            remap(&old, Some(prev.clone()), Some(next.clone())),
            Op::Map(middle.clone())
        ]
    );
    plan.commit();
    assert_eq!(snapshot(&vm).0, vec![prev, middle.clone(), next]);
    let at = |page: u64| {
        let va = GpuVa(BASE + page * PAGE_SIZE + 0x123);
        vm.lookup(va).and_then(|m| m.page_backing(va))
    };
    assert_eq!(at(1), Some(PageBacking::Guest(all[1])));
    assert_eq!(at(5), Some(PageBacking::Guest(all[5])));
    assert_eq!(
        at(3),
        Some(PageBacking::Resource {
            id: B,
            offset: M + PAGE_SIZE
        })
    );
    let next_list = match &vm.lookup(GpuVa(BASE + 4 * PAGE_SIZE)).unwrap().backing {
        MappingBacking::Pages(list) => list.pages().to_vec(),
        other => panic!("{other:?}"),
    };
    assert_eq!(next_list, all[4..]);
}

#[test]
fn the_same_pages_again_is_an_empty_plan_but_other_pages_are_not() {
    let all = pages(50, 4);
    let mut vm = vm_with(&[page_mapping(0, all.clone())]);
    let same = page_mapping(1, all[1..3].to_vec());
    assert!(vm.prepare_map(req(&same), &sizes()).unwrap().is_empty());
    let other = page_mapping(1, pages(1000, 2));
    let plan = vm.prepare_map(req(&other), &sizes()).unwrap();
    assert_eq!(plan.ops().len(), 2);
    check_shape(plan.ops());
    plan.commit();
    assert_eq!(vm.len(), 3);
    assert_eq!(vm.bound_bytes(), 4 * PAGE_SIZE);
}

#[test]
fn a_map_over_many_mappings_unmaps_the_covered_and_remaps_the_ends() {
    let old = vec![
        res(0, 2, A, 0),
        res(2, 3, B, 0),
        res(3, 4, A, 8 * U),
        res(5, 7, B, 4 * U),
    ];
    let mut vm = vm_with(&old);
    let new = res(1, 6, A, M);
    let plan = vm.prepare_map(req(&new), &sizes()).unwrap();
    assert_eq!(
        plan.ops(),
        &[
            remap(&old[0], Some(res(0, 1, A, 0)), None),
            Op::Unmap(old[1].clone()),
            Op::Unmap(old[2].clone()),
            remap(&old[3], None, Some(res(6, 7, B, 5 * U))),
            Op::Map(new.clone()),
        ]
    );
    check_shape(plan.ops());
    plan.commit();
    assert_eq!(
        snapshot(&vm),
        (vec![res(0, 1, A, 0), new, res(6, 7, B, 5 * U)], 7 * U)
    );
}

fn unmap(vm: &mut GpuVm, from: u64, to: u64) -> Vec<Op> {
    let plan = vm.prepare_unmap(va(from), (to - from) * U).unwrap();
    let ops = plan.ops().to_vec();
    check_shape(&ops);
    assert!(!ops.iter().any(|op| matches!(op, Op::Map(_))));
    plan.commit();
    ops
}

#[test]
fn unmap_exact() {
    let m = res(1, 3, A, N);
    let mut vm = vm_with(std::slice::from_ref(&m));
    assert_eq!(unmap(&mut vm, 1, 3), vec![Op::Unmap(m)]);
    assert_eq!(snapshot(&vm), (vec![], 0));
}

#[test]
fn unmap_inside_splits_in_two() {
    let m = res(0, 4, A, N);
    let mut vm = vm_with(std::slice::from_ref(&m));
    let (prev, next) = (res(0, 1, A, N), res(3, 4, A, N + 3 * U));
    assert_eq!(
        unmap(&mut vm, 1, 3),
        vec![remap(&m, Some(prev.clone()), Some(next.clone()))]
    );
    assert_eq!(snapshot(&vm), (vec![prev, next], 2 * U));
}

#[test]
fn unmap_straddling_the_left_end() {
    let m = res(1, 3, A, N);
    let mut vm = vm_with(std::slice::from_ref(&m));
    let next = res(2, 3, A, N + U);
    assert_eq!(
        unmap(&mut vm, 0, 2),
        vec![remap(&m, None, Some(next.clone()))]
    );
    assert_eq!(snapshot(&vm), (vec![next], U));
}

#[test]
fn unmap_straddling_the_right_end() {
    let m = res(1, 3, A, N);
    let mut vm = vm_with(std::slice::from_ref(&m));
    let prev = res(1, 2, A, N);
    assert_eq!(
        unmap(&mut vm, 2, 5),
        vec![remap(&m, Some(prev.clone()), None)]
    );
    assert_eq!(snapshot(&vm), (vec![prev], U));
}

#[test]
fn unmap_straddling_both_ends_of_two_mappings() {
    let (l, r) = (res(0, 2, A, 0), res(2, 4, B, 0));
    let mut vm = vm_with(&[l.clone(), r.clone()]);
    let (prev, next) = (res(0, 1, A, 0), res(3, 4, B, U));
    assert_eq!(
        unmap(&mut vm, 1, 3),
        vec![
            remap(&l, Some(prev.clone()), None),
            remap(&r, None, Some(next.clone()))
        ]
    );
    assert_eq!(snapshot(&vm), (vec![prev, next], 2 * U));
}

#[test]
fn unmap_spanning_many_mappings_and_holes() {
    let old: Vec<Mapping> = (0..10).map(|i| res(2 * i, 2 * i + 1, A, i * U)).collect();
    let mut vm = vm_with(&old);
    let ops = unmap(&mut vm, 2, 15);
    let expected: Vec<Op> = old[1..8].iter().cloned().map(Op::Unmap).collect();
    assert_eq!(ops, expected);
    assert_eq!(
        snapshot(&vm),
        (vec![old[0].clone(), old[8].clone(), old[9].clone()], 3 * U)
    );
}

#[test]
fn unmap_of_an_empty_vm_or_hole_is_an_empty_plan() {
    let mut vm = GpuVm::new(VaLayout::protocol_default());
    assert!(vm.prepare_unmap(va(0), 100 * U).unwrap().is_empty());
    let mut vm = vm_with(&[res(0, 1, A, 0), res(5, 6, A, 0)]);
    let before = snapshot(&vm);
    assert_eq!(unmap(&mut vm, 1, 5), vec![]);
    assert_eq!(snapshot(&vm), before);
}

#[test]
fn a_dropped_plan_changes_nothing() {
    let mut vm = vm_with(&[res(0, 3, A, N)]);
    let before = snapshot(&vm);
    drop(vm.prepare_map(req(&res(1, 2, B, M)), &sizes()).unwrap());
    assert_eq!(snapshot(&vm), before);
    drop(vm.prepare_unmap(va(0), 3 * U).unwrap());
    assert_eq!(snapshot(&vm), before);
    drop(vm.prepare_unmap_resource(A));
    assert_eq!(snapshot(&vm), before);
}

fn reserved_start() -> GpuVa {
    VaLayout::protocol_default().reserved.start
}

#[test]
fn reserved_mappings_are_not_bound_bytes_and_go_with_their_resource() {
    let mut vm = vm_with(&[res(0, 1, A, 0), res(1, 2, B, 0), res(3, 4, A, U)]);
    let session = Mapping {
        va: reserved_start(),
        size: U,
        backing: MappingBacking::Resource { id: A, offset: 0 },
        perms: Perms::RW,
    };
    vm.prepare_map_reserved(req(&session), &sizes())
        .unwrap()
        .commit();
    assert_eq!(vm.bound_bytes(), 3 * U);
    assert_eq!(vm.lookup(reserved_start()), Some(&session));

    let plan = vm.prepare_unmap_resource(A);
    assert_eq!(
        plan.ops(),
        &[
            Op::Unmap(res(0, 1, A, 0)),
            Op::Unmap(res(3, 4, A, U)),
            Op::Unmap(session)
        ]
    );
    assert_eq!(plan.bound_bytes_after(), U);
    plan.commit();
    assert_eq!(snapshot(&vm), (vec![res(1, 2, B, 0)], U));
    assert!(vm.prepare_unmap_resource(A).is_empty());
}

#[test]
fn clear_returns_everything_and_empties_the_vm() {
    let old = vec![res(0, 1, A, 0), res(2, 4, B, 0)];
    let mut vm = vm_with(&old);
    assert_eq!(vm.clear(), old);
    assert_eq!(snapshot(&vm), (vec![], 0));
    assert!(vm.is_empty());
}

#[test]
fn lookup_and_mappings_in_find_overlaps() {
    let old = vec![res(0, 2, A, 0), res(3, 4, B, 0), res(4, 6, A, U)];
    let vm = vm_with(&old);
    assert_eq!(vm.lookup(GpuVa(va(1).raw() + 5)), Some(&old[0]));
    assert_eq!(vm.lookup(va(2)), None);
    assert_eq!(vm.lookup(GpuVa(va(6).raw() - 1)), Some(&old[2]));
    let found: Vec<&Mapping> = vm.mappings_in(GpuVa(va(1).raw()), 3 * U).collect();
    assert_eq!(found, vec![&old[0], &old[1]]);
    assert_eq!(vm.mappings_in(va(2), U).count(), 0);
    assert_eq!(vm.mappings_in(va(0), 0).count(), 0);
    assert_eq!(vm.mappings_in(va(5), u64::MAX).count(), 1);
}

fn page_req(va: u64, size: u64, backing: MappingBacking) -> MapRequest {
    MapRequest {
        va: GpuVa(va),
        size,
        backing,
        perms: Perms::READ,
    }
}

fn res_backing(id: ResourceId, offset: u64) -> MappingBacking {
    MappingBacking::Resource { id, offset }
}

#[test]
fn rejections_name_the_problem_and_change_nothing() {
    let p = PAGE_SIZE;
    let layout = VaLayout::protocol_default();
    let (ap, rs) = (layout.aperture.clone(), layout.reserved.clone());
    let top = !(p - 1);
    let cases: Vec<(&str, MapRequest, GpuVmError)> = vec![
        (
            "zero size",
            page_req(BASE, 0, res_backing(A, 0)),
            GpuVmError::ZeroSize(GpuVa(BASE)),
        ),
        (
            "va + size wraps",
            page_req(top, 2 * p, res_backing(A, 0)),
            GpuVmError::Overflow {
                what: "va",
                start: top,
                size: 2 * p,
            },
        ),
        (
            "below the aperture",
            page_req(0, p, res_backing(A, 0)),
            GpuVmError::OutsideAperture {
                va: GpuVa(0),
                size: p,
                start: ap.start,
                end: ap.end,
            },
        ),
        (
            "above everything",
            page_req(1 << 50, p, res_backing(A, 0)),
            GpuVmError::OutsideAperture {
                va: GpuVa(1 << 50),
                size: p,
                start: ap.start,
                end: ap.end,
            },
        ),
        (
            "crossing into the reserved range",
            page_req(rs.start.raw() - p, 2 * p, res_backing(A, 0)),
            GpuVmError::Reserved {
                va: GpuVa(rs.start.raw() - p),
                size: 2 * p,
                start: rs.start,
                end: rs.end,
            },
        ),
        (
            "inside the reserved range",
            page_req(rs.start.raw(), p, res_backing(A, 0)),
            GpuVmError::Reserved {
                va: rs.start,
                size: p,
                start: rs.start,
                end: rs.end,
            },
        ),
        (
            "misaligned va",
            page_req(BASE + 0x10, p, res_backing(A, 0)),
            GpuVmError::Misaligned {
                what: "va",
                value: BASE + 0x10,
            },
        ),
        (
            "misaligned size",
            page_req(BASE, p + 1, res_backing(A, 0)),
            GpuVmError::Misaligned {
                what: "size",
                value: p + 1,
            },
        ),
        (
            "misaligned offset",
            page_req(BASE, p, res_backing(A, 0x800)),
            GpuVmError::Misaligned {
                what: "offset",
                value: 0x800,
            },
        ),
        (
            "offset + size wraps",
            page_req(BASE, 2 * p, res_backing(A, top)),
            GpuVmError::Overflow {
                what: "offset",
                start: top,
                size: 2 * p,
            },
        ),
        (
            "past the end of the resource",
            page_req(BASE, 2 * p, res_backing(A, 0x100_0000 - p)),
            GpuVmError::BeyondBacking {
                id: A,
                offset: 0x100_0000 - p,
                size: 2 * p,
                resource_size: 0x100_0000,
            },
        ),
        (
            "unknown resource",
            page_req(BASE, p, res_backing(ResourceId(99), 0)),
            GpuVmError::UnknownResource(ResourceId(99)),
        ),
        (
            "too few pages",
            page_req(
                BASE,
                3 * p,
                MappingBacking::Pages(PageArray::new(pages(1, 2))),
            ),
            GpuVmError::PageCount {
                expected: 3,
                actual: 2,
            },
        ),
        (
            "too many pages",
            page_req(BASE, p, MappingBacking::Pages(PageArray::new(pages(1, 2)))),
            GpuVmError::PageCount {
                expected: 1,
                actual: 2,
            },
        ),
        (
            "a misaligned page",
            page_req(
                BASE,
                2 * p,
                MappingBacking::Pages(PageArray::new(vec![
                    GuestPhysAddr(p),
                    GuestPhysAddr(3 * p + 8),
                ])),
            ),
            GpuVmError::Misaligned {
                what: "page",
                value: 3 * p + 8,
            },
        ),
    ];
    let mut vm = vm_with(&[res(0, 2, A, 0)]);
    let before = snapshot(&vm);
    for (name, request, error) in cases {
        let got = vm.prepare_map(request, &sizes()).unwrap_err();
        assert!(!got.to_string().is_empty());
        assert_eq!(got, error, "{name}");
        assert_eq!(snapshot(&vm), before, "{name}");
    }
    let mut no_perms = req(&res(0, 1, A, 0));
    no_perms.perms = Perms::NONE;
    assert_eq!(
        vm.prepare_map(no_perms, &sizes()).unwrap_err(),
        GpuVmError::EmptyPerms
    );
    let msg = GpuVmError::BeyondBacking {
        id: A,
        offset: 0x1000,
        size: 0x2000,
        resource_size: 0x2000,
    }
    .to_string();
    assert!(msg.contains("0x1000") && msg.contains("0x2000"), "{msg}");
    assert_eq!(snapshot(&vm), before);
}

#[test]
fn unmap_rejections() {
    let mut vm = vm_with(&[res(0, 2, A, 0)]);
    let before = snapshot(&vm);
    let rs = VaLayout::protocol_default().reserved;
    assert_eq!(
        vm.prepare_unmap(GpuVa(BASE), 0).unwrap_err(),
        GpuVmError::ZeroSize(GpuVa(BASE))
    );
    assert!(matches!(
        vm.prepare_unmap(GpuVa(BASE + 1), PAGE_SIZE),
        Err(GpuVmError::Misaligned { what: "va", .. })
    ));
    assert!(matches!(
        vm.prepare_unmap(GpuVa(0), PAGE_SIZE),
        Err(GpuVmError::OutsideAperture { .. })
    ));
    assert!(matches!(
        vm.prepare_unmap(rs.start, PAGE_SIZE),
        Err(GpuVmError::Reserved { .. })
    ));
    assert!(matches!(
        vm.prepare_unmap(GpuVa(!(PAGE_SIZE - 1)), 2 * PAGE_SIZE),
        Err(GpuVmError::Overflow { what: "va", .. })
    ));
    assert_eq!(snapshot(&vm), before);
}

#[test]
fn daemon_maps_only_inside_the_reserved_range() {
    let mut vm = GpuVm::new(VaLayout::protocol_default());
    let rs = VaLayout::protocol_default().reserved;
    let in_aperture = req(&res(0, 1, A, 0));
    assert!(matches!(
        vm.prepare_map_reserved(in_aperture, &sizes()),
        Err(GpuVmError::Reserved { .. })
    ));
    let past_end = page_req(rs.end.raw() - PAGE_SIZE, 2 * PAGE_SIZE, res_backing(A, 0));
    assert!(matches!(
        vm.prepare_map_reserved(past_end, &sizes()),
        Err(GpuVmError::Reserved { .. })
    ));
    let last_page = page_req(rs.end.raw() - PAGE_SIZE, PAGE_SIZE, res_backing(A, 0));
    vm.prepare_map_reserved(last_page, &sizes())
        .unwrap()
        .commit();
    assert_eq!(vm.len(), 1);
    assert_eq!(vm.bound_bytes(), 0);
}

#[test]
fn sub_mappings_move_the_backing_and_refuse_bad_ranges() {
    let all = pages(10, 4);
    let m = page_mapping(0, all.clone());
    let part = m
        .sub_mapping(GpuVa(BASE + PAGE_SIZE), 2 * PAGE_SIZE)
        .unwrap();
    assert_eq!(part, page_mapping(1, all[1..3].to_vec()));
    assert_eq!(m.sub_mapping(GpuVa(BASE), 4 * PAGE_SIZE), Some(m.clone()));
    assert_eq!(m.sub_mapping(GpuVa(BASE), 5 * PAGE_SIZE), None, "too long");
    assert_eq!(m.sub_mapping(GpuVa(BASE - PAGE_SIZE), PAGE_SIZE), None);
    assert_eq!(
        m.sub_mapping(GpuVa(BASE + 8), PAGE_SIZE),
        None,
        "misaligned"
    );
    assert_eq!(m.sub_mapping(GpuVa(BASE), 0), None, "empty");
    assert_eq!(m.page_backing(m.end()), None);
    assert_eq!(
        m.page_backing(GpuVa(m.end().raw() - 1)),
        Some(PageBacking::Guest(all[3]))
    );
    let r = res(0, 2, A, N);
    assert_eq!(
        r.sub_mapping(va(1), U),
        Some(res(1, 2, A, N + U)),
        "resource offset advanced"
    );
    assert_eq!(r.resource(), Some(A));
    assert_eq!(m.resource(), None);
    // Lists are equal by content, whatever array they share.
    let list = PageArray::new(all.clone());
    assert_eq!(
        list.sub_list(1, 2),
        Some(PageArray::new(all[1..3].to_vec()))
    );
    assert_eq!(list.sub_list(3, 2), None);
    assert_eq!(list.sub_list(usize::MAX, 2), None);
}
