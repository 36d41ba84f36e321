//! drm_gpuvm's split/merge cases, the unmap cases and the rejections, as
//! tables over the plans the GpuVm prepares and the state it commits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use gpu_backend::gpuvm::{
    Backing, GpuVm, GpuVmError, MapRequest, Mapping, Op, PageList, ResourceSizes, VaLayout,
};
use guest_proto::{GpuVa, GuestPhysAddr, Perms, ResourceId};

const P: u64 = 4096;
const BASE: u64 = 0x100_0000;

struct Sizes(HashMap<u32, u64>);

impl ResourceSizes for Sizes {
    fn resource_size(&self, id: ResourceId) -> Option<u64> {
        self.0.get(&id.0).copied()
    }
}

fn sizes() -> Sizes {
    Sizes(HashMap::from([(1, 64 * P), (2, 64 * P), (3, 4 * P)]))
}

/// A mapping of `pages` pages at page `at` of resource `res` from page `off`.
fn m(at: u64, pages: u64, res: u32, off: u64) -> Mapping {
    Mapping {
        va: GpuVa(BASE + at * P),
        size: pages * P,
        backing: Backing::Resource {
            id: ResourceId(res),
            offset: off * P,
        },
        perms: Perms::RW,
    }
}

fn req(map: &Mapping) -> MapRequest {
    MapRequest {
        va: map.va,
        size: map.size,
        backing: map.backing.clone(),
        perms: map.perms,
    }
}

fn vm_with(existing: &[Mapping]) -> GpuVm {
    let mut vm = GpuVm::new(VaLayout::protocol_default());
    for e in existing {
        vm.prepare_map(req(e), &sizes()).unwrap().commit();
    }
    vm
}

fn state(vm: &GpuVm) -> Vec<Mapping> {
    vm.iter().cloned().collect()
}

struct Case {
    name: &'static str,
    existing: Vec<Mapping>,
    request: Mapping,
    ops: Vec<Op>,
    after: Vec<Mapping>,
}

/// The cases of drm_gpuvm.c's "Split and Merge" documentation, with `a` the
/// existing mapping and `b` the request.
fn split_cases() -> Vec<Case> {
    vec![
        Case {
            name: "1: identical range, other backing -> unmap a, map b",
            existing: vec![m(0, 4, 1, 0)],
            request: m(0, 4, 2, 0),
            ops: vec![Op::Unmap(m(0, 4, 1, 0)), Op::Map(m(0, 4, 2, 0))],
            after: vec![m(0, 4, 2, 0)],
        },
        Case {
            name: "2: identical mapping -> nothing to do",
            existing: vec![m(0, 4, 1, 0)],
            request: m(0, 4, 1, 0),
            ops: vec![],
            after: vec![m(0, 4, 1, 0)],
        },
        Case {
            name: "3: identical range, same resource, other offset -> unmap, map",
            existing: vec![m(0, 4, 1, 0)],
            request: m(0, 4, 1, 8),
            ops: vec![Op::Unmap(m(0, 4, 1, 0)), Op::Map(m(0, 4, 1, 8))],
            after: vec![m(0, 4, 1, 8)],
        },
        Case {
            name: "4: request is the start of a -> remap a (next), map b",
            existing: vec![m(0, 4, 1, 0)],
            request: m(0, 2, 2, 0),
            ops: vec![
                Op::Remap {
                    unmap: m(0, 4, 1, 0),
                    prev: None,
                    next: Some(m(2, 2, 1, 2)),
                },
                Op::Map(m(0, 2, 2, 0)),
            ],
            after: vec![m(0, 2, 2, 0), m(2, 2, 1, 2)],
        },
        Case {
            name: "5: request is the end of a -> remap a (prev), map b",
            existing: vec![m(0, 4, 1, 0)],
            request: m(2, 2, 2, 0),
            ops: vec![
                Op::Remap {
                    unmap: m(0, 4, 1, 0),
                    prev: Some(m(0, 2, 1, 0)),
                    next: None,
                },
                Op::Map(m(2, 2, 2, 0)),
            ],
            after: vec![m(0, 2, 1, 0), m(2, 2, 2, 0)],
        },
        Case {
            name: "6: request inside a -> one remap keeps both pieces",
            existing: vec![m(0, 8, 1, 0)],
            request: m(2, 2, 2, 0),
            ops: vec![
                Op::Remap {
                    unmap: m(0, 8, 1, 0),
                    prev: Some(m(0, 2, 1, 0)),
                    next: Some(m(4, 4, 1, 4)),
                },
                Op::Map(m(2, 2, 2, 0)),
            ],
            after: vec![m(0, 2, 1, 0), m(2, 2, 2, 0), m(4, 4, 1, 4)],
        },
        Case {
            name: "7: request covers a and more -> unmap a, map b",
            existing: vec![m(2, 2, 1, 0)],
            request: m(0, 8, 2, 0),
            ops: vec![Op::Unmap(m(2, 2, 1, 0)), Op::Map(m(0, 8, 2, 0))],
            after: vec![m(0, 8, 2, 0)],
        },
        Case {
            name: "8: request straddles the end of a -> remap a (prev)",
            existing: vec![m(0, 4, 1, 0)],
            request: m(2, 4, 2, 0),
            ops: vec![
                Op::Remap {
                    unmap: m(0, 4, 1, 0),
                    prev: Some(m(0, 2, 1, 0)),
                    next: None,
                },
                Op::Map(m(2, 4, 2, 0)),
            ],
            after: vec![m(0, 2, 1, 0), m(2, 4, 2, 0)],
        },
        Case {
            name: "9: request straddles the start of a -> remap a (next)",
            existing: vec![m(2, 4, 1, 0)],
            request: m(0, 4, 2, 0),
            ops: vec![
                Op::Remap {
                    unmap: m(2, 4, 1, 0),
                    prev: None,
                    next: Some(m(4, 2, 1, 2)),
                },
                Op::Map(m(0, 4, 2, 0)),
            ],
            after: vec![m(0, 4, 2, 0), m(4, 2, 1, 2)],
        },
        Case {
            name: "10: request spans a, c entirely and cuts b and d -> two remaps",
            existing: vec![m(0, 4, 1, 0), m(4, 2, 2, 0), m(6, 2, 1, 6), m(8, 4, 2, 8)],
            request: m(2, 8, 3, 0).with_backing_pages(),
            ops: vec![
                Op::Remap {
                    unmap: m(0, 4, 1, 0),
                    prev: Some(m(0, 2, 1, 0)),
                    next: None,
                },
                Op::Unmap(m(4, 2, 2, 0)),
                Op::Unmap(m(6, 2, 1, 6)),
                Op::Remap {
                    unmap: m(8, 4, 2, 8),
                    prev: None,
                    next: Some(m(10, 2, 2, 10)),
                },
                Op::Map(m(2, 8, 3, 0).with_backing_pages()),
            ],
            after: vec![
                m(0, 2, 1, 0),
                m(2, 8, 3, 0).with_backing_pages(),
                m(10, 2, 2, 10),
            ],
        },
        Case {
            name: "11: request in a hole -> map only",
            existing: vec![m(0, 2, 1, 0), m(6, 2, 1, 6)],
            request: m(2, 4, 2, 0),
            ops: vec![Op::Map(m(2, 4, 2, 0))],
            after: vec![m(0, 2, 1, 0), m(2, 4, 2, 0), m(6, 2, 1, 6)],
        },
        Case {
            name: "12: same backing, other permissions -> unmap, map",
            existing: vec![m(0, 4, 1, 0)],
            request: Mapping {
                perms: Perms::READ,
                ..m(0, 4, 1, 0)
            },
            ops: vec![
                Op::Unmap(m(0, 4, 1, 0)),
                Op::Map(Mapping {
                    perms: Perms::READ,
                    ..m(0, 4, 1, 0)
                }),
            ],
            after: vec![Mapping {
                perms: Perms::READ,
                ..m(0, 4, 1, 0)
            }],
        },
    ]
}

trait WithPages {
    fn with_backing_pages(self) -> Mapping;
}

impl WithPages for Mapping {
    /// The same range backed by a page list (GPA = 0x4000_0000 + index).
    fn with_backing_pages(self) -> Mapping {
        let pages = (0..self.size / P)
            .map(|i| GuestPhysAddr(0x4000_0000 + i * P))
            .collect();
        Mapping {
            backing: Backing::Pages(PageList::new(pages)),
            ..self
        }
    }
}

#[test]
fn map_requests_split_like_drm_gpuvm() {
    for case in split_cases() {
        let mut vm = vm_with(&case.existing);
        let plan = vm.prepare_map(req(&case.request), &sizes()).unwrap();
        assert_eq!(plan.ops(), case.ops.as_slice(), "{}", case.name);
        plan.commit();
        assert_eq!(state(&vm), case.after, "{}", case.name);
        let bound: u64 = case.after.iter().map(|m| m.size).sum();
        assert_eq!(vm.bound_bytes(), bound, "{}", case.name);
    }
}

#[test]
fn a_dropped_plan_changes_nothing() {
    for case in split_cases() {
        let mut vm = vm_with(&case.existing);
        drop(vm.prepare_map(req(&case.request), &sizes()).unwrap());
        assert_eq!(state(&vm), case.existing, "{}", case.name);
    }
}

#[test]
fn unmap_cases() {
    let three = vec![m(0, 4, 1, 0), m(4, 4, 2, 0), m(8, 4, 1, 8)];
    type UnmapCase = (&'static str, Vec<Mapping>, (u64, u64), usize, Vec<Mapping>);
    let cases: Vec<UnmapCase> = vec![
        (
            "exact",
            three.clone(),
            (4, 4),
            1,
            vec![m(0, 4, 1, 0), m(8, 4, 1, 8)],
        ),
        (
            "inside",
            three.clone(),
            (5, 2),
            1,
            vec![m(0, 4, 1, 0), m(4, 1, 2, 0), m(7, 1, 2, 3), m(8, 4, 1, 8)],
        ),
        (
            "straddling left",
            three.clone(),
            (2, 4),
            2,
            vec![m(0, 2, 1, 0), m(6, 2, 2, 2), m(8, 4, 1, 8)],
        ),
        (
            "straddling right",
            three.clone(),
            (6, 4),
            2,
            vec![m(0, 4, 1, 0), m(4, 2, 2, 0), m(10, 2, 1, 10)],
        ),
        (
            "straddling both",
            three.clone(),
            (2, 8),
            3,
            vec![m(0, 2, 1, 0), m(10, 2, 1, 10)],
        ),
        ("spanning many", three.clone(), (0, 12), 3, vec![]),
        ("hole", vec![m(0, 2, 1, 0)], (4, 4), 0, vec![m(0, 2, 1, 0)]),
        ("empty vm", vec![], (0, 16), 0, vec![]),
    ];
    for (name, existing, (at, pages), n_ops, after) in cases {
        let mut vm = vm_with(&existing);
        let plan = vm.prepare_unmap(GpuVa(BASE + at * P), pages * P).unwrap();
        assert_eq!(plan.ops().len(), n_ops, "{name}");
        assert!(
            plan.ops().iter().all(|op| !matches!(op, Op::Map(_))),
            "{name}"
        );
        let remaps = plan
            .ops()
            .iter()
            .filter(|op| matches!(op, Op::Remap { .. }))
            .count();
        assert!(remaps <= 2, "{name}");
        plan.commit();
        assert_eq!(state(&vm), after, "{name}");
    }
}

#[test]
fn unmap_resource_removes_only_its_mappings() {
    let mut vm = vm_with(&[m(0, 4, 1, 0), m(4, 4, 2, 0), m(8, 4, 1, 8)]);
    let plan = vm.prepare_unmap_resource(ResourceId(1));
    assert_eq!(plan.ops().len(), 2);
    plan.commit();
    assert_eq!(state(&vm), vec![m(4, 4, 2, 0)]);
    assert_eq!(vm.bound_bytes(), 4 * P);
}

#[test]
fn rejections_change_nothing() {
    let layout = VaLayout::protocol_default();
    let reserved = layout.reserved.start.raw();
    let r = |va: u64, size: u64, res: u32, off: u64| MapRequest {
        va: GpuVa(va),
        size,
        backing: Backing::Resource {
            id: ResourceId(res),
            offset: off,
        },
        perms: Perms::RW,
    };
    let cases: Vec<(&str, MapRequest, GpuVmError)> = vec![
        (
            "zero size",
            r(BASE, 0, 1, 0),
            GpuVmError::ZeroSize(GpuVa(BASE)),
        ),
        (
            "misaligned va",
            r(BASE + 1, P, 1, 0),
            GpuVmError::Misaligned {
                what: "va",
                value: BASE + 1,
            },
        ),
        (
            "misaligned size",
            r(BASE, P + 8, 1, 0),
            GpuVmError::Misaligned {
                what: "size",
                value: P + 8,
            },
        ),
        (
            "misaligned offset",
            r(BASE, P, 1, 12),
            GpuVmError::Misaligned {
                what: "offset",
                value: 12,
            },
        ),
        (
            "overflow near u64::MAX",
            r(u64::MAX - P + 1, 2 * P, 1, 0),
            GpuVmError::Overflow {
                va: GpuVa(u64::MAX - P + 1),
                size: 2 * P,
            },
        ),
        (
            "NULL guard",
            r(0, P, 1, 0),
            GpuVmError::OutsideAperture {
                va: GpuVa(0),
                size: P,
            },
        ),
        (
            "reserved range",
            r(reserved, P, 1, 0),
            GpuVmError::Reserved {
                va: GpuVa(reserved),
                size: P,
            },
        ),
        (
            "straddling into reserved",
            r(reserved - P, 2 * P, 1, 0),
            GpuVmError::Reserved {
                va: GpuVa(reserved - P),
                size: 2 * P,
            },
        ),
        (
            "past 2^48",
            r(1 << 48, P, 1, 0),
            GpuVmError::OutsideAperture {
                va: GpuVa(1 << 48),
                size: P,
            },
        ),
        (
            "unknown resource",
            r(BASE, P, 9, 0),
            GpuVmError::UnknownResource(ResourceId(9)),
        ),
        (
            "offset beyond the backing",
            r(BASE, 2 * P, 3, 3 * P),
            GpuVmError::BeyondBacking {
                id: ResourceId(3),
                offset: 3 * P,
                size: 2 * P,
                resource_size: 4 * P,
            },
        ),
        (
            "offset overflow",
            r(BASE, P, 3, u64::MAX - P + 1),
            GpuVmError::BeyondBacking {
                id: ResourceId(3),
                offset: u64::MAX - P + 1,
                size: P,
                resource_size: 4 * P,
            },
        ),
        (
            "page count mismatch",
            MapRequest {
                va: GpuVa(BASE),
                size: 2 * P,
                backing: Backing::Pages(PageList::new(vec![GuestPhysAddr(0x1000)])),
                perms: Perms::RW,
            },
            GpuVmError::PageCount {
                expected: 2,
                actual: 1,
            },
        ),
        (
            "unaligned page",
            MapRequest {
                va: GpuVa(BASE),
                size: P,
                backing: Backing::Pages(PageList::new(vec![GuestPhysAddr(0x1008)])),
                perms: Perms::RW,
            },
            GpuVmError::Misaligned {
                what: "page",
                value: 0x1008,
            },
        ),
        (
            "no permissions",
            MapRequest {
                perms: Perms::NONE,
                ..r(BASE, P, 1, 0)
            },
            GpuVmError::EmptyPerms,
        ),
    ];
    for (name, request, error) in cases {
        let mut vm = vm_with(&[m(0, 4, 1, 0)]);
        let got = vm.prepare_map(request, &sizes()).map(|_| ()).unwrap_err();
        assert_eq!(got, error, "{name}");
        assert_eq!(state(&vm), vec![m(0, 4, 1, 0)], "{name}");
    }
    let mut vm = vm_with(&[]);
    assert_eq!(
        vm.prepare_unmap(GpuVa(reserved), P)
            .map(|_| ())
            .unwrap_err(),
        GpuVmError::Reserved {
            va: GpuVa(reserved),
            size: P
        }
    );
    // The daemon's own reserved mappings are not guest binds.
    let plan = vm
        .prepare_map_reserved(r(reserved, P, 1, 0), &sizes())
        .unwrap();
    plan.commit();
    assert_eq!(vm.bound_bytes(), 0);
    assert!(vm.lookup(GpuVa(reserved)).is_some());
    assert!(vm.prepare_map_reserved(r(BASE, P, 1, 0), &sizes()).is_err());
}

#[test]
fn lookup_and_range_queries() {
    let vm = vm_with(&[m(0, 4, 1, 0), m(8, 4, 2, 0)]);
    assert_eq!(vm.lookup(GpuVa(BASE + 3 * P + 5)), Some(&m(0, 4, 1, 0)));
    assert_eq!(vm.lookup(GpuVa(BASE + 4 * P)), None);
    let within: Vec<_> = vm
        .mappings_in(GpuVa(BASE + 2 * P), 8 * P)
        .cloned()
        .collect();
    assert_eq!(within, vec![m(0, 4, 1, 0), m(8, 4, 2, 0)]);
    assert_eq!(vm.mappings_in(GpuVa(BASE + 4 * P), 4 * P).count(), 0);
}
